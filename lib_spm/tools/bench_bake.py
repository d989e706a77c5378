"""``python -m lib_spm bench bake-memory``: peak memory of baking, on a full-size random checkpoint.

Builds a single-file LDM checkpoint with the real key names and shapes (the UNet from the WebUI
ground truth in ``tests/fixtures``, the text encoders as the WebUI's checkpoints carry them,
int64 ``position_ids`` included, a VAE of the real layout, and one bool tensor), streamed to disk
tensor by tensor with random values. Then bakes a random SPM over every adapted layer into it in
a fresh process and reports that process's peak RSS against the checkpoint's size.

``--code DIR`` bakes with the ``lib_spm`` found in DIR instead (an older checkout, for before /
after figures); ``--float-only`` leaves the non-float tensors out (older code refused them).
Linux and macOS only (peak RSS comes from ``resource``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..errors import SPMValueError
from ..format.checkpoint_io import DTYPE_NAMES, Planned, write_stream, write_tensor

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
_FIXTURE = {"sd1": "ldm_unet_modules_sd15.json", "sdxl": "ldm_unet_modules_sdxl.json"}
_SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
             "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
             "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
             "posterior_mean_coef1", "posterior_mean_coef2")

Spec = list  # [(name, torch dtype or None for the float dtype chosen, shape)]


def _unet(arch: str) -> Spec:
    path = FIXTURES / _FIXTURE[arch]
    if not path.is_file():
        raise SPMValueError(f"{path} is missing: the benchmark runs from a checkout of the repository")
    modules = json.loads(path.read_text())["modules"]
    return [(f"model.diffusion_model.{m['name']}.{p}", None, tuple(shape))
            for m in modules for p, shape in m.get("params", {}).items()]


def _clip_l(prefix: str) -> Spec:
    """CLIP ViT-L/14 text model, as in SD1 and SDXL checkpoints (int64 position_ids included)."""
    w, spec = 768, [(prefix + "embeddings.position_ids", torch.int64, (1, 77)),
                    (prefix + "embeddings.token_embedding.weight", None, (49408, 768)),
                    (prefix + "embeddings.position_embedding.weight", None, (77, 768))]
    for i in range(12):
        p = f"{prefix}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            spec += [(f"{p}self_attn.{proj}.weight", None, (w, w)), (f"{p}self_attn.{proj}.bias", None, (w,))]
        for norm in ("layer_norm1", "layer_norm2"):
            spec += [(f"{p}{norm}.weight", None, (w,)), (f"{p}{norm}.bias", None, (w,))]
        spec += [(f"{p}mlp.fc1.weight", None, (4 * w, w)), (f"{p}mlp.fc1.bias", None, (4 * w,)),
                 (f"{p}mlp.fc2.weight", None, (w, 4 * w)), (f"{p}mlp.fc2.bias", None, (w,))]
    return spec + [(prefix + "final_layer_norm.weight", None, (w,)), (prefix + "final_layer_norm.bias", None, (w,))]


def _open_clip_bigg(prefix: str) -> Spec:
    """OpenCLIP ViT-bigG/14 text model, SDXL's second encoder."""
    w = 1280
    spec = [(prefix + "positional_embedding", None, (77, w)), (prefix + "text_projection", None, (w, w)),
            (prefix + "token_embedding.weight", None, (49408, w)), (prefix + "logit_scale", None, ()),
            (prefix + "ln_final.weight", None, (w,)), (prefix + "ln_final.bias", None, (w,))]
    for i in range(32):
        p = f"{prefix}transformer.resblocks.{i}."
        spec += [(p + "attn.in_proj_weight", None, (3 * w, w)), (p + "attn.in_proj_bias", None, (3 * w,)),
                 (p + "attn.out_proj.weight", None, (w, w)), (p + "attn.out_proj.bias", None, (w,)),
                 (p + "ln_1.weight", None, (w,)), (p + "ln_1.bias", None, (w,)),
                 (p + "ln_2.weight", None, (w,)), (p + "ln_2.bias", None, (w,)),
                 (p + "mlp.c_fc.weight", None, (4 * w, w)), (p + "mlp.c_fc.bias", None, (4 * w,)),
                 (p + "mlp.c_proj.weight", None, (w, 4 * w)), (p + "mlp.c_proj.bias", None, (w,))]
    return spec


def _conv(p: str, o: int, i: int, k: int) -> Spec:
    return [(p + ".weight", None, (o, i, k, k)), (p + ".bias", None, (o,))]


def _norm(p: str, c: int) -> Spec:
    return [(p + ".weight", None, (c,)), (p + ".bias", None, (c,))]


def _resblock(p: str, i: int, o: int) -> Spec:
    spec = _norm(p + ".norm1", i) + _conv(p + ".conv1", o, i, 3) + _norm(p + ".norm2", o) + _conv(p + ".conv2", o, o, 3)
    return spec + (_conv(p + ".nin_shortcut", o, i, 1) if i != o else [])


def _mid(p: str, c: int) -> Spec:
    attn = _norm(p + ".attn_1.norm", c) + [t for n in ("q", "k", "v", "proj_out") for t in _conv(f"{p}.attn_1.{n}", c, c, 1)]
    return _resblock(p + ".block_1", c, c) + attn + _resblock(p + ".block_2", c, c)


def _vae(prefix: str) -> Spec:
    """The SD autoencoder (ch 128, mult 1,2,4,4, 4 latent channels) in the LDM layout."""
    chans = [128, 256, 512, 512]
    spec, c = _conv(prefix + "encoder.conv_in", 128, 3, 3), 128
    for lvl, o in enumerate(chans):
        for b in range(2):
            spec += _resblock(f"{prefix}encoder.down.{lvl}.block.{b}", c, o)
            c = o
        if lvl < 3:
            spec += _conv(f"{prefix}encoder.down.{lvl}.downsample.conv", c, c, 3)
    spec += _mid(prefix + "encoder.mid", 512) + _norm(prefix + "encoder.norm_out", 512)
    spec += _conv(prefix + "encoder.conv_out", 8, 512, 3) + _conv(prefix + "decoder.conv_in", 512, 4, 3)
    spec += _mid(prefix + "decoder.mid", 512)
    c = 512
    for lvl in reversed(range(4)):
        for b in range(3):
            spec += _resblock(f"{prefix}decoder.up.{lvl}.block.{b}", c, chans[lvl])
            c = chans[lvl]
        if lvl > 0:
            spec += _conv(f"{prefix}decoder.up.{lvl}.upsample.conv", c, c, 3)
    spec += _norm(prefix + "decoder.norm_out", 128) + _conv(prefix + "decoder.conv_out", 3, 128, 3)
    return spec + _conv(prefix + "quant_conv", 8, 8, 1) + _conv(prefix + "post_quant_conv", 4, 4, 1)


def checkpoint_spec(arch: str, float_only: bool = False) -> Spec:
    """Every tensor of a full-size single-file checkpoint of ``arch``: (name, dtype, shape)."""
    if arch == "sd1":
        spec = ([(n, None, (1000,)) for n in _SCHEDULE] + [("model_ema.decay", torch.float32, ()),
                                                           ("model_ema.num_updates", torch.int32, ())]
                + _unet("sd1") + _clip_l("cond_stage_model.transformer.text_model.") + _vae("first_stage_model."))
    elif arch == "sdxl":
        spec = (_unet("sdxl") + _clip_l("conditioner.embedders.0.transformer.text_model.")
                + _open_clip_bigg("conditioner.embedders.1.model.") + _vae("first_stage_model."))
    else:
        raise SPMValueError(f"no checkpoint layout for {arch!r}; choose sd1 or sdxl")
    spec.append(("spm_bench.bool_mask", torch.bool, (77, 77)))  # real files rarely have one; bake must copy it
    if float_only:
        spec = [s for s in spec if s[1] is None or s[1].is_floating_point]
    return spec


def _random(dtype: torch.dtype, shape: tuple, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if not dtype.is_floating_point:
        return torch.arange(math.prod(shape), dtype=dtype).reshape(shape)  # position_ids: 0..76
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write_checkpoint(path: Path, spec: Spec, dtype: torch.dtype, seed: int = 0) -> Path:
    """Stream a random checkpoint of ``spec`` to ``path`` (one tensor in memory at a time)."""
    g = torch.Generator().manual_seed(seed)
    plan = []
    for name, dt, shape in spec:
        dt = dt or dtype
        plan.append(Planned(name, DTYPE_NAMES[dt], tuple(shape),
                            lambda out, dt=dt, shape=shape: write_tensor(out, _random(dt, shape, g))))
    return write_stream(path, plan, {"format": "pt", "spm_bench": "random weights"})


def write_spm(path: Path, arch: str, layer_keys: set[str] | None = None, rank: int = 4, seed: int = 1) -> Path:
    """A random SPM over every adapted layer of ``arch`` (or those whose LDM weight is in ``layer_keys``)."""
    from ..format import archs
    from ..format.metadata import SPMMetadata
    from ..format.names import layer_names
    from ..format.spm_file import SPMFile, parse_state_dict
    from ..format.zoo import zoo_state_dict

    ref = archs.reference_unet(arch)
    layers = parse_state_dict(zoo_state_dict(ref, rank=rank, seed=seed, std=0.05))
    if layer_keys is not None:
        ldm = {n.key: f"model.diffusion_model.{n.ldm}.weight" for n in layer_names(ref).values()}
        layers = {k: lw for k, lw in layers.items() if ldm[k] in layer_keys}
    SPMFile(layers, SPMMetadata(targets=["bench"], arch=arch, name="bench")).save(path)
    return path


_CHILD = r"""
import json, resource, sys, time
code, src, dst, spm_path, arch = sys.argv[1:6]
sys.path.insert(0, code)
import torch
try:
    from lib_spm.format.spm_file import load_spm
    from lib_spm.operations.merge import bake_ldm_checkpoint
except ImportError:  # an older checkout (--code): the core was flat then
    from lib_spm.merge import bake_ldm_checkpoint
    from lib_spm.spm_file import load_spm
spm = load_spm(spm_path)
scale = 1024 if sys.platform != "darwin" else 1
try:  # RSS now (Linux); the high-water mark elsewhere
    import os
    before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
except OSError:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
t0 = time.perf_counter()
rep = bake_ldm_checkpoint(src, dst, [(spm, 1.0)], arch=arch)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
print(json.dumps({"baseline_rss": before, "peak_rss": peak, "seconds": seconds, "layers": rep["layers"]}))
"""


def bake_peak_rss(src: Path, dst: Path, spm: Path, arch: str, code: Path | None = None) -> dict:
    """Bake in a fresh process; its peak RSS, and its RSS before baking (torch, the SPM loaded)."""
    code = code or Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(code), str(src), str(dst), str(spm), arch],
                          capture_output=True, text=True, cwd=str(dst.parent))
    if proc.returncode != 0:
        raise SPMValueError(f"the bake process failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_bake_memory(arch: str = "sd1", dtype: str = "fp16", *, float_only: bool = False, code: str | None = None,
                      workdir: str | None = None, only: list[str] | None = None, spec: Spec | None = None) -> dict:
    """Write the checkpoint and the SPM, bake in a fresh process, report peak RSS vs file size.

    ``only``: keep just the float tensors whose names contain one of these strings (a smaller
    file, for code whose peak would not fit the machine at full size)."""
    tdtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    spec = spec if spec is not None else checkpoint_spec(arch, float_only)
    if only:
        spec = [t for t in spec if any(o in t[0] for o in only) or (t[1] is not None and not t[1].is_floating_point)]
    with tempfile.TemporaryDirectory(prefix="spm-bench-bake-", dir=workdir) as d:
        folder = Path(d)
        t0 = time.perf_counter()
        src = write_checkpoint(folder / "model.safetensors", spec, tdtype)
        written = time.perf_counter() - t0
        spm = write_spm(folder / "bench_spm.safetensors", arch, {name for name, _, _ in spec})
        res = bake_peak_rss(src, folder / "baked.safetensors", spm, arch, Path(code) if code else None)
        size = src.stat().st_size
        out_size = (folder / "baked.safetensors").stat().st_size
    gib = 1 << 30
    return {
        "arch": arch, "dtype": dtype, "tensors": len(spec), "float_only": float_only, "only": only or "all",
        "code": code or "this checkout", "checkpoint_gib": round(size / gib, 3), "baked_gib": round(out_size / gib, 3),
        "layers_baked": res["layers"], "peak_rss_gib": round(res["peak_rss"] / gib, 3),
        "rss_before_bake_gib": round(res["baseline_rss"] / gib, 3),  # torch imported, the SPM loaded
        "peak_over_file": round(res["peak_rss"] / size, 3),
        "growth_over_file": round((res["peak_rss"] - res["baseline_rss"]) / size, 3),
        "bake_seconds": round(res["seconds"], 1), "write_checkpoint_seconds": round(written, 1),
    }
