"""The diffusers host: the only place that knows how diffusers pipelines lay out batch rows and
encode prompts, and how a diffusers UNet is called for training. Usage::

    spms = [(load_spm("no_cat.safetensors"), 1.0)]
    with SPMPipeline(pipe, spms) as apply:
        images = apply(prompt=["a cat", "a dog"], negative_prompt=["", ""]).images

    backend = DiffusersBackend(pipe.unet, encode, pipe.scheduler.alphas_cumprod, (4, 64, 64))
    train_spm(backend, TrainConfig(targets=["cat"]), "no_cat.safetensors")
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import SPMValueError
from ..format.spm_file import SPMFile
from ..runtime.gating import GateSettings
from ..runtime.session import Session
from ..training.schedule import eps_from_v
from ..training.trainer import Conditioning


class TextEncoderConcepts:
    """ConceptEncoder for a CLIP tokenizer + text encoder, encoding as SD1/SD2 pipelines do.

    SDXL pipelines concatenate two encoders' penultimate hidden states: pass both pairs and
    ``penultimate=True``; the result then has the 2048-wide layout the SDXL UNet receives.
    """

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence, *, penultimate: bool = False):
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError("give one tokenizer per text encoder")
        self.tokenizers, self.text_encoders, self.penultimate = list(tokenizers), list(text_encoders), penultimate

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        outs = []
        for tok, te in zip(self.tokenizers, self.text_encoders):
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(te.device)
            res = te(ids, output_hidden_states=self.penultimate)
            outs.append(res.hidden_states[-2] if self.penultimate else res[0])
        return torch.cat(outs, dim=-1)

    def tokens(self, texts: list[str]) -> list[tuple[int, ...]]:
        tok = self.tokenizers[0]
        special = set(tok.all_special_ids)
        ids = tok(texts, truncation=True).input_ids
        return [tuple(i for i in row if i not in special) for row in ids]


def row_texts(
    prompts: Sequence[str], negative_prompts: Sequence[str] | None, num_images_per_prompt: int, cfg: bool
) -> list[str]:
    """The prompt behind each UNet batch row of a diffusers pipeline: [uncond..., cond...]."""
    cond = [p for p in prompts for _ in range(num_images_per_prompt)]
    if not cfg:
        return cond
    neg = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    if len(neg) != len(prompts):
        raise ValueError("give one negative prompt per prompt")
    return [n for n in neg for _ in range(num_images_per_prompt)] + cond


class SPMPipeline:
    """Run a diffusers SD pipeline with SPMs applied under per-row Facilitated Transport."""

    def __init__(self, pipe, spms: Sequence[tuple[SPMFile, float]], *, gate: GateSettings = GateSettings()):
        self.pipe = pipe
        if hasattr(pipe, "text_encoder_2"):
            encoder = TextEncoderConcepts([pipe.tokenizer, pipe.tokenizer_2],
                                          [pipe.text_encoder, pipe.text_encoder_2], penultimate=True)
        else:
            encoder = TextEncoderConcepts([pipe.tokenizer], [pipe.text_encoder])
        self._encoder = encoder
        self._rows: list[tuple[int, ...]] | None = None
        self.session = Session(pipe.unet, spms, encoder=encoder, gate=gate, row_tokens=self._row_tokens)

    def _row_tokens(self, batch: int):
        return self._rows if self._rows is not None and len(self._rows) == batch else None

    def __enter__(self):
        self.session.attach()
        return self

    def __exit__(self, *exc):
        self.session.detach()

    def __call__(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1, guidance_scale: float = 7.5, **kw):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        texts = row_texts(prompts, negs, num_images_per_prompt, guidance_scale > 1.0)
        self._rows = self._encoder.tokens(texts)
        try:
            return self.pipe(prompt=prompts, negative_prompt=negs, num_images_per_prompt=num_images_per_prompt,
                             guidance_scale=guidance_scale, **kw)
        finally:
            self._rows = None


class DiffusersBackend:
    """The trainer's :class:`~lib_spm.training.trainer.Backend` for a diffusers ``UNet2DConditionModel`` with
    an encode function (SD1/SD2/SDXL, eps or v prediction).

    ``decode`` (latents -> [B, 3, H, W] in [0, 1]), when given, lets a job show previews.
    """

    def __init__(self, unet, encode: Callable[[list[str]], Conditioning], alphas_cumprod: torch.Tensor,
                 latent_shape: tuple[int, int, int], prediction_type: str = "epsilon",
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise SPMValueError(f"unsupported prediction type {prediction_type!r}")
        self.unet, self._encode, self.decode = unet, encode, decode
        self.alphas_cumprod = alphas_cumprod.float()
        self.latent_shape = tuple(latent_shape)
        self.prediction_type = prediction_type

    def encode(self, prompts):
        return self._encode(prompts)

    def predict_eps(self, x, t, cond):
        kw = {"added_cond_kwargs": cond.added} if cond.added is not None else {}
        out = self.unet(x, t, cond.context, **kw).sample
        if self.prediction_type == "epsilon":
            return out
        return eps_from_v(out, x, self.alphas_cumprod, t)
