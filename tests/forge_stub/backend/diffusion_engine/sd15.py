"""``backend.diffusion_engine.sd15.StableDiffusion`` around the shapes world: what ``shared.sd_model``
is in Forge. No ``.model`` and no ``cond_stage_model``: the UNet is
``forge_objects.unet.model.diffusion_model`` (its Linear layers ``ForgeOperations.Linear``),
the schedule ``forge_objects.unet.model.predictor.alphas_cumprod``, prompts go through
``text_processing_engine`` and ``get_learned_conditioning`` runs under inference mode."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from ..operations import use_forge_linears


class ClassicTextProcessingEngine:
    """``process_texts`` as Forge's classic engine chunks: [start] + up to 75 tokens + [end] padding."""

    chunk_length = 75

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.id_start, self.id_end = tokenizer.bos_token_id, tokenizer.eos_token_id

    def process_texts(self, texts):
        batch_chunks, token_count = [], 0
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            token_count = max(token_count, len(ids))
            chunks = []
            for a in range(0, max(len(ids), 1), self.chunk_length):
                body = ids[a:a + self.chunk_length]
                tokens = [self.id_start] + body + [self.id_end] * (self.chunk_length - len(body) + 1)
                chunks.append(SimpleNamespace(tokens=tokens, multipliers=[1.0] * len(tokens), fixes=[]))
            batch_chunks.append(chunks)
        return batch_chunks, token_count


class Predictor:
    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = alphas_cumprod


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model, predictor, computation_dtype=torch.float32):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = predictor
        self.computation_dtype = computation_dtype

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        dtype = self.computation_dtype
        return self.diffusion_model(x.to(dtype), t, context=c_crossattn.to(dtype), control=control,
                                    transformer_options=transformer_options).float()


class UnetPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}


class ForgeObjects:
    def __init__(self, unet, clip=None, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class StableDiffusion:
    def __init__(self, world, dtype: torch.dtype | None = None):
        from lib_spm.world.model import new_scheduler

        self.world = world
        with torch.inference_mode():  # Forge loads its models under inference mode
            unet = use_forge_linears(copy.deepcopy(world.unet), dtype)
        unet.__class__ = type("IntegratedUNet2DConditionModel", (_LdmCall, type(unet)), {})
        self.scheduler = new_scheduler()
        predictor = Predictor(self.scheduler.alphas_cumprod)
        self.forge_objects = ForgeObjects(unet=UnetPatcher(KModel(unet, predictor)))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.text_processing_engine = ClassicTextProcessingEngine(world.text_encoder.tokenizer)
        self.is_sd1 = True  # "WebUI Legacy"
        self.sd_checkpoint_info = SimpleNamespace(title="shapes-world-forge.safetensors [0]")

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]):
        return self.world.text_encoder.encode(list(prompt))


class _LdmCall:
    """``forward(x, timesteps, context, control=None, transformer_options={}, **kwargs)``."""

    def forward(self, x, timesteps=None, context=None, control=None, transformer_options={}, **kwargs):
        return super().forward(x, timesteps, context).sample
