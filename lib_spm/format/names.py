"""Layer names: file keys <-> modules of a diffusers or an LDM (ldm/sgm, as the WebUI builds it) UNet.

Names are resolved forward, as STYLE.md asks: walk the model, compute every module's names in
both dialects, then look the file's keys up. The block correspondence is derived from the
model's own structure (how many resnets a level has, where the samplers are), never from
hard-coded block numbers; only the per-module suffix tables below are fixed, because they are
facts of the two codebases' class definitions.

Dialects of a key (the part before ``.lora_down.weight``):
- ``lora_unet_<diffusers path>``: what the original SPM trainer and kohya SD1 files use, and what
  we write;
- ``lora_unet_<ldm path>``: kohya SDXL files;
- ``diffusion_model_<ldm path>``: the WebUI's own ``network_layer_name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from ..errors import SPMKeyError, UnresolvedKeysError
from .archs import unet_layout

# diffusers ResnetBlock2D child -> LDM ResBlock child
_RESNET_SUFFIX = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_SUFFIX_BACK = {v: k for k, v in _RESNET_SUFFIX.items()}

# top-level single modules: diffusers -> LDM
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# Where SPMs adapt: every Linear-like layer and Conv2d inside a transformer block container.
TRANSFORMER_CONTAINERS = ("Transformer2DModel", "SpatialTransformer")


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"`` or ``"conv"`` for a module an SPM can adapt, None for any other.

    The one place that decides what is adaptable (naming, placement, the runtime and the adapter
    ask it). Linear is judged by what a layer is, not by its class: ``nn.Linear`` and look-alikes
    such as Forge's ``ForgeOperations.Linear`` (an ``nn.Module`` with ``in_features``/
    ``out_features`` and a ``weight``, possibly stored quantised).
    """
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return None
    ins, outs = getattr(module, "in_features", None), getattr(module, "out_features", None)
    weight = getattr(module, "weight", None)
    if isinstance(ins, int) and isinstance(outs, int) and weight is not None and hasattr(weight, "dtype"):
        return "linear"
    return None


def is_linear(module: nn.Module) -> bool:
    return layer_kind(module) == "linear"


_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def factor_dtype(module: nn.Module) -> torch.dtype:
    """The dtype to keep an SPM's factors in for this layer: its weight's, if that is one models
    compute in; fp32 for storage-only formats (fp8, NF4, GGUF), which Forge casts per call (the
    factors follow each call's output dtype anyway)."""
    dtype = getattr(getattr(module, "weight", None), "dtype", None)
    return dtype if dtype in _COMPUTE_DTYPES else torch.float32


@dataclass(frozen=True)
class LayerName:
    path: str  # qualified name inside the UNet given
    diffusers: str  # the diffusers module path
    ldm: str  # the LDM module path

    @property
    def key(self) -> str:
        """The canonical file key (diffusers dialect), as the original trainer writes it."""
        return "lora_unet_" + self.diffusers.replace(".", "_")

    @property
    def ldm_key(self) -> str:
        return "lora_unet_" + self.ldm.replace(".", "_")

    @property
    def webui_name(self) -> str:
        """The built-in Lora's ``network_layer_name`` of this module in the WebUI."""
        return "diffusion_model_" + self.ldm.replace(".", "_")

    def dialects(self) -> tuple[str, str, str]:
        return (self.key, self.ldm_key, self.webui_name)


def _cls(m: nn.Module) -> str:
    return type(m).__name__


# -- block correspondence, derived from structure ------------------------------------------------

def _pairs_from_diffusers(unet: nn.Module) -> Iterator[tuple[str, str, str]]:
    """Yield (diffusers prefix, ldm prefix, kind) for every block; kind picks the suffix table."""
    n = 1  # input_blocks.0 is conv_in
    for lvl, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            yield f"down_blocks.{lvl}.resnets.{j}", f"input_blocks.{n}.0", "resnet"
            if attns is not None:
                yield f"down_blocks.{lvl}.attentions.{j}", f"input_blocks.{n}.1", "same"
            n += 1
        if getattr(block, "downsamplers", None) is not None:
            yield f"down_blocks.{lvl}.downsamplers.0.conv", f"input_blocks.{n}.0.op", "same"
            n += 1
    mid = unet.mid_block
    if mid is not None:
        m = 0
        for i, _ in enumerate(mid.resnets):
            if i > 0 and getattr(mid, "attentions", None) is not None:
                yield f"mid_block.attentions.{i - 1}", f"middle_block.{m}", "same"
                m += 1
            yield f"mid_block.resnets.{i}", f"middle_block.{m}", "resnet"
            m += 1
    n = 0
    for lvl, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        last = len(block.resnets) - 1
        for j in range(last + 1):
            yield f"up_blocks.{lvl}.resnets.{j}", f"output_blocks.{n}.0", "resnet"
            if attns is not None:
                yield f"up_blocks.{lvl}.attentions.{j}", f"output_blocks.{n}.1", "same"
            if j == last and getattr(block, "upsamplers", None) is not None:
                k = 2 if attns is not None else 1
                yield f"up_blocks.{lvl}.upsamplers.0.conv", f"output_blocks.{n}.{k}.conv", "same"
            n += 1


def _pairs_from_ldm(unet: nn.Module) -> Iterator[tuple[str, str, str]]:
    def seq(prefix, blocks, kind_of_sampler, sampler_attr, diff_root):
        lvl, j = 0, 0
        for n, block in enumerate(blocks):
            if prefix == "input_blocks" and n == 0:
                continue  # conv_in, handled by _TOP
            ended_level = False
            for k, child in enumerate(block):
                c = _cls(child)
                if c == "ResBlock":
                    yield f"{diff_root}.{lvl}.resnets.{j}", f"{prefix}.{n}.{k}", "resnet"
                elif c in TRANSFORMER_CONTAINERS:
                    yield f"{diff_root}.{lvl}.attentions.{j}", f"{prefix}.{n}.{k}", "same"
                elif c == kind_of_sampler:
                    yield f"{diff_root}.{lvl}.{sampler_attr}.0.conv", f"{prefix}.{n}.{k}.{'op' if c == 'Downsample' else 'conv'}", "same"
                    ended_level = True
                else:
                    raise SPMKeyError(f"unexpected {c} at {prefix}.{n}.{k}; not an LDM UNet we know")
            lvl, j = (lvl + 1, 0) if ended_level else (lvl, j + 1)

    yield from seq("input_blocks", unet.input_blocks, "Downsample", "downsamplers", "down_blocks")
    r = a = 0
    for m, child in enumerate(unet.middle_block):
        if _cls(child) == "ResBlock":
            yield f"mid_block.resnets.{r}", f"middle_block.{m}", "resnet"
            r += 1
        elif _cls(child) in TRANSFORMER_CONTAINERS:
            yield f"mid_block.attentions.{a}", f"middle_block.{m}", "same"
            a += 1
        else:
            raise SPMKeyError(f"unexpected {_cls(child)} at middle_block.{m}")
    yield from seq("output_blocks", unet.output_blocks, "Upsample", "upsamplers", "up_blocks")


def _translate(path: str, table: list[tuple[str, str, str]], back: bool) -> str | None:
    src_i, dst_i = (1, 0) if back else (0, 1)
    for row in table:
        src, dst, kind = row[src_i], row[dst_i], row[2]
        if path == src:
            return dst
        if path.startswith(src + "."):
            rest = path[len(src) + 1:]
            if kind == "resnet":
                suffixes = _RESNET_SUFFIX_BACK if back else _RESNET_SUFFIX
                for s, d in suffixes.items():
                    if rest == s or rest.startswith(s + "."):
                        rest = d + rest[len(s):]
                        break
                else:
                    return None  # e.g. an activation with no counterpart module
            return f"{dst}.{rest}"
    return None


def layer_names(unet: nn.Module) -> dict[str, LayerName]:
    """Names in both dialects for every Linear/Conv2d of a UNet, by path."""
    kind = unet_layout(unet)
    if kind == "diffusers":
        table = [(d, l, "same") for d, l in _TOP.items()] + list(_pairs_from_diffusers(unet))
    else:
        table = [(d, l, "same") for d, l in _TOP.items()] + list(_pairs_from_ldm(unet))
    table.sort(key=lambda row: -len(row[0 if kind == "diffusers" else 1]))  # longest prefix first
    out = {}
    for path, module in unet.named_modules():
        if layer_kind(module) is None:
            continue
        other = _translate(path, table, back=(kind == "ldm"))
        if other is None:
            continue
        out[path] = LayerName(path, path, other) if kind == "diffusers" else LayerName(path, other, path)
    return out


def spm_layer_paths(unet: nn.Module) -> list[str]:
    """Paths of the layers an SPM adapts: every Linear/Conv2d inside a transformer container."""
    paths = []
    for path, module in unet.named_modules():
        if _cls(module) in TRANSFORMER_CONTAINERS:
            for sub, child in module.named_modules():
                if sub and layer_kind(child) is not None:
                    paths.append(f"{path}.{sub}")
    return paths


def resolve(keys: list[str], unet: nn.Module, names: dict[str, LayerName] | None = None) -> dict[str, str]:
    """Map every file key (any dialect) to a module path; raise listing the keys that map nowhere.

    ``names`` (``layer_names(unet)``) saves the model walk when resolving several files.
    """
    index: dict[str, str] = {}
    for name in (names if names is not None else layer_names(unet)).values():
        for dialect in name.dialects():
            index[dialect] = name.path
    resolved, missing, seen = {}, [], {}
    for key in keys:
        path = index.get(key)
        if path is None:
            missing.append(key)
            continue
        if path in seen:
            raise SPMKeyError(f"keys {seen[path]!r} and {key!r} both name module {path}")
        seen[path] = key
        resolved[key] = path
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UnresolvedKeysError(f"{len(missing)} key(s) match no layer of this UNet: {shown}", missing)
    return resolved
