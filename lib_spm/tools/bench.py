"""``python -m lib_spm bench runtime``: what applying SPMs costs per UNet call, at full size.

Times a full-size UNet (random weights; speed does not depend on their values) without SPMs and
with 1, 4 and 16 SPMs attached, gated per row, in one process, interleaving the configurations
round by round so that machine noise hits all of them alike. Reports the median seconds per call
and each configuration's ratio to the bare UNet.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..format import archs
from ..format.metadata import SPMMetadata
from ..format.spm_file import SPMFile, parse_state_dict
from ..format.zoo import zoo_state_dict
from ..progress import Progress
from ..runtime.gating import GateSettings
from ..runtime.session import Session


class _SeededEncoder:
    """Concept encodings of the right shape for timing (gate values do not change the cost)."""

    def __init__(self, width: int):
        self.width = width

    def encode(self, texts):
        g = torch.Generator().manual_seed(len(texts))
        return torch.randn(len(texts), 77, self.width, generator=g)

    def tokens(self, texts):
        return [(i + 1000,) for i, _ in enumerate(texts)]


def _spm(unet, i: int) -> SPMFile:
    layers = parse_state_dict(zoo_state_dict(unet, rank=1, seed=i))
    return SPMFile(layers, SPMMetadata(targets=[f"concept {i}"], rank=1, alpha=1.0, name=f"spm{i}"))


def bench_runtime(arch: str = "sd1", latent: int = 32, batch: int = 2, rounds: int = 5, counts=(1, 4, 16)) -> dict:
    torch.manual_seed(0)
    cfg = archs.reference_config(arch)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**cfg).eval()
    width = cfg["cross_attention_dim"]
    spms = [_spm(unet, i) for i in range(max(counts))]
    x = torch.randn(batch, 4, latent, latent)
    t = torch.full((batch,), 500)
    ctx = torch.randn(batch, 77, width)
    extra = {}
    if arch == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 1280), "time_ids": torch.randn(batch, 6)}}
    configs = {0: None, **{n: Session(unet, [(s, 1.0) for s in spms[:n]], encoder=_SeededEncoder(width),
                                      gate=GateSettings()) for n in counts}}
    times = {n: [] for n in configs}
    progress = Progress(f"bench runtime {arch} latent {latent}", rounds * len(configs) + 1)
    with torch.no_grad():
        unet(x, t, ctx, **extra)  # warm-up
        progress.advance(note="warm-up")
        for r in range(rounds):
            for n, session in configs.items():
                if session is not None:
                    session.attach()
                t0 = time.perf_counter()
                unet(x, t, ctx, **extra)
                times[n].append(time.perf_counter() - t0)
                if session is not None:
                    session.detach()
                progress.advance(note=f"round {r + 1}, {n} SPMs")
    progress.close()
    base = statistics.median(times[0])
    return {
        "arch": arch, "latent": latent, "batch": batch, "rounds": rounds, "threads": torch.get_num_threads(),
        "median_seconds": {n: round(statistics.median(v), 4) for n, v in times.items()},
        "ratio_to_bare_unet": {n: round(statistics.median(v) / base, 4) for n, v in times.items()},
        # each round's time over the same round's bare call, then the median: robust to slow phases
        "paired_ratio": {n: round(statistics.median(a / b for a, b in zip(v, times[0])), 4) for n, v in times.items()},
    }
