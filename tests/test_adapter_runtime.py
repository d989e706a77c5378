"""The trainable adapter and the runtime agree on the file the trainer saves.

What an SPM does while it trains (``TrainableAdapter``'s hooks) must be what users get when the
saved file is applied (``Session`` at strength 1, Facilitated Transport off): same layers, same
factors, same scale. Checked on tiny seeded UNets with convolutional (SD1-style) and linear
(SDXL-style, added conditioning) transformer projections.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from models import CTX, ToyEncoder, sdxl_added, tiny_sd1, tiny_sdxl

from lib_spm import GateSettings, Session, load_spm
from lib_spm.format.metadata import SPMMetadata
from lib_spm.hosts.diffusers import DiffusersBackend
from lib_spm.training.adapter import TrainableAdapter
from lib_spm.training.train_config import TrainConfig
from lib_spm.training.trainer import Conditioning, train_spm

ACP = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def _inputs(seed: int, added: bool):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 8, CTX, generator=g) * 4
    kw = {"added_cond_kwargs": sdxl_added(3)} if added else {}
    return x, torch.tensor([10, 500, 990]), ctx, kw


def _randomised(unet, rank: int, alpha: float) -> TrainableAdapter:
    """An adapter whose ``up`` factors are random too (a fresh one starts as the identity)."""
    g = torch.Generator().manual_seed(7)
    adapter = TrainableAdapter(unet, rank=rank, alpha=alpha, generator=g)
    with torch.no_grad():
        for up in adapter.up:
            up.copy_(torch.randn(up.shape, generator=g) * 0.3)
    return adapter


def _trained(unet, rank: int, alpha: float, path) -> TrainableAdapter:
    """The adapter of a short real training run (the file is the one ``train_spm`` writes)."""
    enc, seen = ToyEncoder(), []
    backend = DiffusersBackend(unet, lambda ps: Conditioning(enc.encode(ps) * 4), ACP, (4, 8, 8))
    cfg = TrainConfig(targets=["circle"], iterations=3, lr=5e-2, warmup=1, max_denoising_steps=3, anchors=1,
                      la_strength=1.0, rank=rank, alpha=alpha, seed=1, name="no_circle")
    train_spm(backend, cfg, path, watch=seen.append)
    return seen[-1].adapter


@pytest.mark.parametrize("case", ["sd1 conv projections, randomised", "sdxl linear projections, randomised",
                                  "sd1 conv projections, trained"])
def test_adapter_forward_equals_session_on_the_saved_file(case, tmp_path):
    sdxl, trained = case.startswith("sdxl"), case.endswith("trained")
    unet = tiny_sdxl(seed=2) if sdxl else tiny_sd1(seed=2)
    rank, alpha = 2, 3.0  # a scale alpha / rank other than 1: both sides must apply it once
    path = tmp_path / "spm.safetensors"
    if trained:
        adapter = _trained(unet, rank, alpha, path)
    else:
        adapter = _randomised(unet, rank, alpha)
        adapter.to_spm(SPMMetadata(targets=["circle"], name="random")).save(path)
    x, t, ctx, kw = _inputs(3, sdxl)
    with torch.no_grad():
        base = unet(x, t, ctx, **kw).sample
        adapter.attach()
        try:
            trained_out = unet(x, t, ctx, **kw).sample
        finally:
            adapter.detach()
        spm = load_spm(path)
        assert spm.rank == rank and spm.metadata.alpha == alpha and len(spm.layers) == len(adapter.paths)
        with Session(unet, [(spm, 1.0)], gate=GateSettings(enabled=False)):
            applied = unet(x, t, ctx, **kw).sample
        after = unet(x, t, ctx, **kw).sample
    change = (trained_out - base).abs().max().item()
    assert change > 1e-3, change  # the adapter really acts, so agreement below means something
    torch.testing.assert_close(applied, trained_out, rtol=1e-5, atol=1e-5 * max(1.0, change))
    assert torch.equal(after, base)  # both leave the UNet as it was
