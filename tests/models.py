"""Tiny seeded models for the test table: real diffusers UNets, an LDM-named tree built from the
WebUI fixtures, and a toy concept encoder. Everything runs on CPU in milliseconds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel

FIXTURES = Path(__file__).parent / "fixtures"
CTX = 12  # text width of the tiny models
L = 8  # tokens per encoded prompt chunk of the toy encoder


def tiny_sd1(linear_projection: bool = False, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CTX, attention_head_dim=2, use_linear_projection=linear_projection,
    ).eval()


def tiny_sdxl(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=CTX, attention_head_dim=(2, 4, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=CTX + 6 * 4,
    ).eval()


def sdxl_added(batch: int) -> dict:
    return {"text_embeds": torch.randn(batch, CTX), "time_ids": torch.randn(batch, 6)}


# -- an LDM-named module tree from the WebUI's real module list ----------------------------------

def _shrink(d: int) -> int:
    """Full-size widths are multiples of 64 (and 4 latent channels); keep their ratios, tiny."""
    return max(d // 64, 1) if d >= 64 else d


def ldm_tree(tag: str, seed: int = 0) -> nn.Module:
    """The WebUI's UNet module tree (``sd15``/``sdxl``) with its real names and class names.

    Linear/Conv2d layers are real, with every width divided by 64; containers get their real
    class names so structure walks see what they would see in the WebUI. Its forward runs every
    layer of every SpatialTransformer on row-dependent inputs: enough to exercise hooks.
    """
    torch.manual_seed(seed)
    mods = json.loads((FIXTURES / f"ldm_unet_modules_{tag}.json").read_text())["modules"]
    classes: dict[str, type] = {}
    root = _container("UNetModel", classes)
    for m in mods[1:]:
        parent_name, _, child = m["name"].rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        if m["class"] == "Linear":
            mod = nn.Linear(_shrink(m["in_features"]), _shrink(m["out_features"]), bias="bias" in m["params"])
        elif m["class"] == "Conv2d":
            mod = nn.Conv2d(_shrink(m["in_channels"]), _shrink(m["out_channels"]), tuple(m["kernel_size"]),
                            tuple(m["stride"]), tuple(m["padding"]), bias="bias" in m["params"])
        else:
            mod = _container(m["class"], classes)
        parent.add_module(child, mod)
    return root


def _container(name: str, classes: dict) -> nn.Module:
    if name not in classes:
        base = _LdmRoot if name == "UNetModel" else _Container
        classes[name] = type(name, (base,), {})
    return classes[name]()


class _Container(nn.Module):
    def __iter__(self):  # TimestepEmbedSequential-like iteration over children
        return iter(self._modules.values())


class _LdmRoot(_Container):
    def forward(self, x, timesteps=None, context=None, **kwargs):
        """Feed each transformer layer an input made from x's and context's rows; return all outputs."""
        outs = []
        B = x.shape[0]
        feat = x.flatten(1).float()
        for name, module in self.named_modules():
            if type(module).__name__ != "SpatialTransformer":
                continue
            for sub, layer in module.named_modules():
                if isinstance(layer, nn.Linear):
                    width = layer.in_features
                    src = context if sub.endswith(("attn2.to_k", "attn2.to_v")) else None
                    if src is not None and src.shape[-1] == width:
                        inp = src
                    else:
                        inp = _rowwise(feat, width * 3).reshape(B, 3, width)
                    outs.append(layer(inp).flatten(1))
                elif isinstance(layer, nn.Conv2d):
                    inp = _rowwise(feat, layer.in_channels * 4).reshape(B, layer.in_channels, 2, 2)
                    outs.append(layer(inp).flatten(1))
        return torch.cat(outs, dim=1)


def _rowwise(feat: torch.Tensor, n: int) -> torch.Tensor:
    """n features per row, tiled from the row's own input (so rows stay distinct)."""
    return feat.repeat(1, -(-n // feat.shape[1]))[:, :n]


PIPE_WIDTH = 32


def tiny_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lib_spm.tools.clip_vocab import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=PIPE_WIDTH, attention_head_dim=4,
    )
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=PIPE_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- a toy concept encoder ------------------------------------------------------------------------

class ToyEncoder:
    """Words -> seeded vectors; a prompt is [start, words..., end padding] of L tokens, like CLIP."""

    START, END = 1, 2

    def __init__(self, width: int = CTX):
        self.width = width

    def ids(self, text: str) -> list[int]:
        return [3 + int(hashlib.sha256(w.encode()).hexdigest()[:6], 16) % 5000 for w in text.lower().split()]

    def _vec(self, i: int) -> torch.Tensor:
        return torch.randn(self.width, generator=torch.Generator().manual_seed(i))

    def encode_one(self, text: str) -> torch.Tensor:
        ids = ([self.START] + self.ids(text) + [self.END] * L)[:L]
        return torch.stack([self._vec(i) for i in ids])

    def encode(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.encode_one(t) for t in texts])

    def tokens(self, texts: list[str]) -> list[tuple[int, ...]]:
        return [tuple(self.ids(t)) for t in texts]
