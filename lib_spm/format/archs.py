"""The Stable Diffusion architectures an SPM can be made for, and how to tell them apart: the one
place that answers "what model is this?" (:func:`unet_arch`, :func:`unet_layout`; a file's layers
through :func:`arch_from_context_dim`).

An SPM's architecture shows in its shapes: the cross-attention ``to_k``/``to_v`` layers read the
text encoder's width (768 for SD1.x, 1024 for SD2.x, 2048 for SDXL and Pony). The reference
configurations are the published diffusers ``UNet2DConditionModel`` configs; building one on the
``meta`` device costs no memory and gives every layer's name and shape.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import SPMKeyError, SPMShapeError

CONTEXT_DIM = {"sd1": 768, "sd2": 1024, "sdxl": 2048}

_COMMON = dict(in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32)
_CONFIGS = {
    "sd1": dict(
        _COMMON,
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "sd2": dict(
        _COMMON,
        sample_size=96,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
    "sdxl": dict(
        _COMMON,
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}


class LayerLimits(NamedTuple):
    """What a UNet offers an adapter: its Linear/Conv2d layers, their widest input and output, the
    largest kernel side and the largest weight (elements). An SPM adapts a subset of these layers."""

    layers: int
    max_in: int
    max_out: int
    max_kernel: int
    max_weight: int


# Counted from reference_unet(arch) by layer_limits() (tests/test_files.py checks the table): kept
# as data because building the three reference UNets costs seconds that loading a file must not.
LAYER_LIMITS = {
    "sd1": LayerLimits(282, 5120, 10240, 3, 29_491_200),
    "sd2": LayerLimits(282, 5120, 10240, 3, 29_491_200),
    "sdxl": LayerLimits(794, 5120, 10240, 3, 29_491_200),
}


def any_arch_limits() -> LayerLimits:
    """The largest of every supported architecture's limits: what any SPM file may declare."""
    return LayerLimits(*(max(col) for col in zip(*LAYER_LIMITS.values())))


def layer_limits(unet: torch.nn.Module) -> LayerLimits:
    from .names import is_linear  # names asks this module for the layout: imported late

    n = max_in = max_out = max_kernel = max_weight = 0
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            ins, outs, kernel = module.in_channels, module.out_channels, max(module.kernel_size)
        elif is_linear(module):
            ins, outs, kernel = module.in_features, module.out_features, 1
        else:
            continue
        n += 1
        max_in, max_out, max_kernel = max(max_in, ins), max(max_out, outs), max(max_kernel, kernel)
        max_weight = max(max_weight, module.weight.numel())
    return LayerLimits(n, max_in, max_out, max_kernel, max_weight)


def reference_config(arch: str) -> dict:
    return dict(_CONFIGS[arch])


def reference_unet(arch: str):
    """A full-size diffusers UNet of ``arch`` on the meta device: names and shapes, no weights."""
    from diffusers import UNet2DConditionModel  # optional: only the CLI and tests need it

    with torch.device("meta"):
        return UNet2DConditionModel(**_CONFIGS[arch])


def arch_from_context_dim(dim: int) -> str | None:
    """``sd1``/``sd2``/``sdxl`` for the text width a UNet's cross-attention reads; None for others."""
    for arch, d in CONTEXT_DIM.items():
        if d == dim:
            return arch
    return None


def context_dim_of_layers(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The text width the cross-attention key projections read, from ``{key: down shape}``."""
    dims = {shape[1] for key, shape in shapes.items() if key.endswith(("attn2_to_k", "attn2_to_v"))}
    if len(dims) > 1:
        raise SPMShapeError(f"cross-attention layers disagree on the text width: {sorted(dims)}")
    return dims.pop() if dims else None


def unet_context_dim(unet: torch.nn.Module) -> int | None:
    from .names import is_linear  # names asks this module for the layout: imported late

    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k") and is_linear(module):
            return module.in_features
    return None


def unet_arch(unet: torch.nn.Module) -> str | None:
    """The architecture of a loaded UNet (diffusers or LDM) by its cross-attention text width;
    None when it has no cross-attention or reads a width none of ours has."""
    dim = unet_context_dim(unet)
    return arch_from_context_dim(dim) if dim else None


def unet_layout(unet: torch.nn.Module) -> str:
    """``diffusers`` or ``ldm`` (ldm/sgm, as the WebUI builds it): whose module tree the UNet has."""
    if all(hasattr(unet, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        return "diffusers"
    if all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        return "ldm"
    raise SPMKeyError(f"{type(unet).__name__} is neither a diffusers nor an LDM UNet")
