"""``python -m lib_spm bench runtime``: what applying SPMs costs per UNet call, at full size.

Times a full-size UNet (random weights; speed does not depend on their values) without SPMs and
with 1, 4 and 16 SPMs attached, gated per row (every gate open: the prompt names each concept),
in one process, interleaving the configurations round by round in a rotating order so that
machine noise hits all of them alike. Reports the median seconds per call, each configuration's
ratio to the bare UNet, and the ratio read inside each call (the call's time over the same call
less the time spent in the session's hooks), which a loaded machine skews least. With
``out_of_place``, the largest count is also timed adding out of place (another hook ahead of ours),
as the runtime did before it accumulated into the layer's output.
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


class _PromptEncoder:
    """Encodes every concept as the timed prompt itself, so every gate opens: the cost measured is
    that of a prompt naming all the applied concepts, the worst case (a closed gate skips the work)."""

    def __init__(self, ctx: torch.Tensor):
        self.ctx = ctx

    def encode(self, texts):
        return self.ctx[:1].expand(len(texts), -1, -1).clone()

    def tokens(self, texts):
        return [(i + 1000,) for i, _ in enumerate(texts)]


class _TimedSession(Session):
    """A session that also adds up the time spent in its own hooks, so the cost of the SPMs can be
    read inside each timed call (call / (call - hooks)), where machine noise hits both alike."""

    hook_seconds = 0.0

    def _timed(self, hook, *a):
        t0 = time.perf_counter()
        try:
            return hook(*a)
        finally:
            self.hook_seconds += time.perf_counter() - t0

    def _on_unet_call(self, *a):
        return self._timed(super()._on_unet_call, *a)

    def _on_layer(self, *a):
        return self._timed(super()._on_layer, *a)


def _spm(unet, i: int) -> SPMFile:
    layers = parse_state_dict(zoo_state_dict(unet, rank=1, seed=i))
    return SPMFile(layers, SPMMetadata(targets=[f"concept {i}"], rank=1, alpha=1.0, name=f"spm{i}"))


def bench_runtime(arch: str = "sd1", latent: int = 32, batch: int = 2, rounds: int = 5, counts=(1, 4, 16),
                  out_of_place: bool = True, config: dict | None = None) -> dict:
    """``out_of_place`` adds, for the largest count, the same SPMs with another forward hook ahead
    of ours on every adapted layer: the runtime then adds out of place (what it did before it
    accumulated into the layer's output), timed side by side. ``config`` replaces the
    architecture's full-size UNet config (tests)."""
    torch.manual_seed(0)
    cfg = config or archs.reference_config(arch)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**cfg).eval()
    width = cfg["cross_attention_dim"]
    spms = [_spm(unet, i) for i in range(max(counts))]
    x = torch.randn(batch, 4, latent, latent)
    t = torch.full((batch,), 500)
    ctx = torch.randn(1, 77, width).expand(batch, -1, -1).contiguous()
    encoder = _PromptEncoder(ctx)
    extra = {}
    if arch == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 1280), "time_ids": torch.randn(batch, 6)}}
    configs = {"0": None, **{str(n): _TimedSession(unet, [(s, 1.0) for s in spms[:n]], encoder=encoder,
                                                  gate=GateSettings()) for n in counts}}
    if out_of_place:
        n = max(counts)
        configs[f"{n} out of place"] = _TimedSession(unet, [(s, 1.0) for s in spms[:n]], encoder=encoder,
                                                     gate=GateSettings())
    times: dict[str, list[float]] = {k: [] for k in configs}
    in_call: dict[str, list[float]] = {k: [] for k in configs if configs[k] is not None}
    gate_min: dict[str, float] = {}
    progress = Progress(f"bench runtime {arch} latent {latent}", rounds * len(configs) + 1)
    with torch.no_grad():
        unet(x, t, ctx, **extra)  # warm-up
        progress.advance(note="warm-up")
        keys = list(configs)
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotate: no configuration always runs first
                session, extra_handles = configs[k], []
                if session is not None:
                    session.hook_seconds = 0.0
                    session.attach()
                    if k.endswith("out of place"):
                        extra_handles = [unet.get_submodule(p).register_forward_hook(_noop, prepend=True)
                                         for p in session.layer_paths]
                t0 = time.perf_counter()
                unet(x, t, ctx, **extra)
                times[k].append(time.perf_counter() - t0)
                if session is not None:
                    in_call[k].append(times[k][-1] / (times[k][-1] - session.hook_seconds))
                    gate_min[k] = round(float(session.last_gates.min()), 4)
                    for h in extra_handles:
                        h.remove()
                    session.detach()
                progress.advance(note=f"round {r + 1}, {k} SPMs")
    progress.close()
    base = statistics.median(times["0"])
    return {
        "arch": arch, "latent": latent, "batch": batch, "rounds": rounds, "threads": torch.get_num_threads(),
        "gate_min": gate_min,  # every gate open: the SPMs did their work on every row
        "median_seconds": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "ratio_to_bare_unet": {k: round(statistics.median(v) / base, 4) for k, v in times.items()},
        # each round's time over the same round's bare call, then the median: robust to slow phases
        "paired_ratio": {k: round(statistics.median(a / b for a, b in zip(v, times["0"])), 4) for k, v in times.items()},
        # each call's time over the same call less the time spent in the session's hooks: the
        # ratio read inside one call, which load on the machine cannot skew between configurations
        "in_call_ratio": {k: round(statistics.median(v), 4) for k, v in in_call.items()},
    }


def _noop(module, args, output):
    return None
