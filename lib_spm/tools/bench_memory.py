"""``python -m lib_spm bench train-memory``: peak memory of SPM training on a full-size UNet.

Builds the architecture's reference UNet with random weights (memory does not depend on their
values), trains a few iterations with the real trainer (:func:`~lib_spm.training.trainer.train_spm`
through :class:`~lib_spm.hosts.diffusers.DiffusersBackend`) on seeded random conditioning, and reports
the peak: ``ru_maxrss`` of a fresh child process (so the figure is that run's alone) and, where
a GPU exists, ``torch.cuda.max_memory_allocated``. ``plain`` turns the memory savers off
(gradient checkpointing, autocast) to measure what they save.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from ..errors import SPMValueError

DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}


def check_args(arch: str, resolution: int | None, iterations: int, max_denoising_steps: int, anchors: int) -> int:
    """The resolution to use; :class:`SPMValueError` for settings the run cannot take."""
    if arch not in DEFAULT_RESOLUTION:
        raise SPMValueError(f"unknown architecture {arch!r}; choose one of {', '.join(DEFAULT_RESOLUTION)}")
    res = DEFAULT_RESOLUTION[arch] if resolution is None else resolution
    if res < 64 or res % 64:
        raise SPMValueError(f"resolution must be a multiple of 64 (the UNet halves the latent 3 times), not {res}")
    if iterations < 1 or max_denoising_steps < 2 or anchors < 0:
        raise SPMValueError("iterations must be >= 1, max denoising steps >= 2, anchors >= 0")
    return res


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _encoder(arch: str, width: int, resolution: int, device, dtype):
    from ..training.trainer import Conditioning

    def encode(prompts: list[str]) -> Conditioning:
        g = torch.Generator().manual_seed(zlib.crc32("\n".join(prompts).encode()))
        ctx = torch.randn(len(prompts), 77, width, generator=g).to(device, dtype)
        added = None
        if arch == "sdxl":
            added = {"text_embeds": torch.randn(len(prompts), 1280, generator=g).to(device, dtype),
                     "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(prompts),
                                              dtype=dtype, device=device)}
        return Conditioning(ctx, added)

    return encode


def measure(arch: str, resolution: int, iterations: int, max_denoising_steps: int, anchors: int,
            plain: bool) -> dict:
    """Run in this process (the CLI runs it in a fresh child): build, train, report peaks."""
    from diffusers import UNet2DConditionModel

    from ..format import archs
    from ..hosts.diffusers import DiffusersBackend
    from ..progress import Progress
    from ..training.train_config import TrainConfig
    from ..training.trainer import train_spm

    t0 = time.time()
    torch.manual_seed(0)
    cfg = archs.reference_config(arch)
    unet = UNet2DConditionModel(**cfg)
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    if cuda:
        unet.to(device, dtype)  # fp16 weights on a GPU, as hosts hold them
    rss_model = _rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_model = torch.cuda.memory_allocated() / 2**20
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    backend = DiffusersBackend(unet, _encoder(arch, cfg["cross_attention_dim"], resolution, device, dtype),
                               torch.cumprod(1 - betas, 0), (4, resolution // 8, resolution // 8))
    tcfg = TrainConfig(targets=["concept"], iterations=iterations, max_denoising_steps=max_denoising_steps,
                       anchors=anchors, seed=0, name="bench", arch=arch)
    progress = Progress(f"train-memory {arch} {resolution}px {'plain' if plain else 'savers'}", iterations)
    with tempfile.TemporaryDirectory() as d:
        t1 = time.time()
        res = train_spm(backend, tcfg, Path(d) / "bench.safetensors", on_step=progress.on_train_step,
                        gradient_checkpointing=not plain, autocast=not plain)
        train_s = time.time() - t1
    progress.close()
    out = {
        "arch": arch, "resolution": resolution, "iterations": iterations, "max_denoising_steps": max_denoising_steps,
        "anchors": anchors, "memory_savers": not plain, "device": str(device), "weights_dtype": str(dtype)[6:],
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "peak_rss_mib": round(_rss_mib(), 1), "rss_after_model_mib": round(rss_model, 1),
        "passes_per_iteration": round(sum(h.passes for h in res.history) / len(res.history), 1),
        "seconds_per_iteration": round(train_s / iterations, 2), "seconds": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
    }
    out["training_rss_mib"] = round(out["peak_rss_mib"] - out["rss_after_model_mib"], 1)
    if cuda:
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_model_mib"] = round(cuda_model, 1)
    return out


def run_fresh(arch: str, resolution: int, iterations: int, max_denoising_steps: int, anchors: int,
              plain: bool) -> dict:
    """:func:`measure` in a new Python process, so its peak RSS is this run's alone."""
    args = json.dumps([arch, resolution, iterations, max_denoising_steps, anchors, plain])
    proc = subprocess.run([sys.executable, "-m", "lib_spm.tools.bench_memory", args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring process failed (exit {proc.returncode}); see its output above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_train_memory(arch: str, resolution: int | None = None, iterations: int = 2, max_denoising_steps: int = 30,
                       anchors: int = 4, compare: bool = False) -> dict:
    """The memory savers' run; with ``compare``, the plain run too (in its own process) and the ratios."""
    res = check_args(arch, resolution, iterations, max_denoising_steps, anchors)
    saver = run_fresh(arch, res, iterations, max_denoising_steps, anchors, plain=False)
    if not compare:
        return saver
    plain = run_fresh(arch, res, iterations, max_denoising_steps, anchors, plain=True)
    out = {"with_savers": saver, "plain": plain,
           "peak_rss_ratio": round(saver["peak_rss_mib"] / plain["peak_rss_mib"], 3),
           "training_rss_ratio": round(saver["training_rss_mib"] / max(plain["training_rss_mib"], 1e-9), 3)}
    if "cuda_peak_allocated_mib" in saver:
        out["cuda_peak_ratio"] = round(saver["cuda_peak_allocated_mib"] / plain["cuda_peak_allocated_mib"], 3)
    return out


if __name__ == "__main__":
    print(json.dumps(measure(*json.loads(sys.argv[1]))))
