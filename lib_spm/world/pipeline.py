"""Sampling and judging in the shapes world: the host that owns its batch-row layout.

Rows of every UNet call are [negative prompts..., prompts...] (the diffusers order); the
pipeline records each row's prompt so a :class:`~lib_spm.runtime.session.Session` can gate rows by
their own text.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from ..format.spm_file import SPMFile
from ..runtime.gating import GateSettings
from ..runtime.session import Session
from . import data
from .model import LATENT, World, decode_latent, new_scheduler


class WorldPipeline:
    def __init__(self, world: World):
        self.world = world
        self._rows: list[tuple[int, ...]] | None = None

    # -- SPMs -----------------------------------------------------------------------------------
    def row_tokens(self, batch: int):
        return self._rows if self._rows is not None and len(self._rows) == batch else None

    def session(self, spms: Sequence[tuple[SPMFile, float]], gate: GateSettings = GateSettings(), **kw) -> Session:
        return Session(self.world.unet, spms, encoder=self.world.text_encoder, gate=gate,
                       row_tokens=self.row_tokens, **kw)

    @contextmanager
    def applied(self, spms, gate: GateSettings = GateSettings(), **kw):
        with self.session(spms, gate, **kw) as s:
            yield s

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, seed: int = 0, steps: int = 20, cfg: float = 4.0,
                 negative: str = "", batch: int = 64) -> torch.Tensor:
        """[N, 3, 32, 32] images in [0, 1]; image i's noise depends only on (seed, i)."""
        out = []
        for start in range(0, len(prompts), batch):
            chunk = list(prompts[start : start + batch])
            noise = torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(seed * 100_003 + start + i))
                                 for i in range(len(chunk))])
            out.append(decode_latent(self._denoise(chunk, noise, steps, cfg, negative)))
        return torch.cat(out)

    def _denoise(self, prompts, x, steps, cfg, negative):
        te, unet = self.world.text_encoder, self.world.unet
        texts = [negative] * len(prompts) + list(prompts)
        ctx = te.encode(texts)
        sched = new_scheduler()
        sched.set_timesteps(steps)
        self._rows = te.tokens(texts)
        try:
            for t in sched.timesteps:
                eps = unet(torch.cat([x, x]), t, ctx).sample
                un, co = eps.chunk(2)
                x = sched.step(un + cfg * (co - un), t, x).prev_sample
        finally:
            self._rows = None
        return x

    # -- judging --------------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, c = self.world.classifier(images)
        return s.argmax(1), c.argmax(1)


def prompt_labels(prompt: str) -> tuple[int | None, int | None]:
    """The shape and colour a prompt asks for (synonyms included), or None where it names none."""
    words = f" {prompt.lower()} "
    shape = next((i for i, s in enumerate(data.SHAPES)
                  if f" {s} " in words or any(f" {syn} " in words for syn in data.SYNONYMS[s])), None)
    colour = next((i for i, c in enumerate(data.COLOUR_NAMES) if f" {c} " in words), None)
    return shape, colour


def accuracy(pipe: WorldPipeline, prompts: Sequence[str], n: int = 16, seed: int = 0, **gen) -> dict[str, dict]:
    """Per prompt: share of n samples whose shape / colour the classifier finds as asked."""
    expanded = [p for p in prompts for _ in range(n)]
    shapes, colours = pipe.classify(pipe.generate(expanded, seed=seed, **gen))
    res = {}
    for k, p in enumerate(prompts):
        s, c = prompt_labels(p)
        sl, cl = shapes[k * n : (k + 1) * n], colours[k * n : (k + 1) * n]
        res[p] = {
            "shape": None if s is None else (sl == s).float().mean().item(),
            "colour": None if c is None else (cl == c).float().mean().item(),
            "shape_counts": torch.bincount(sl, minlength=len(data.SHAPES)).tolist(),
        }
    return res


def world_backend(world: World):
    """The trainer's backend for the shapes world (SD1-style conditioning, epsilon prediction)."""
    from ..hosts.diffusers import DiffusersBackend
    from ..training.trainer import Conditioning
    from .model import SCHEDULE

    sched = new_scheduler()
    assert sched.config.num_train_timesteps == SCHEDULE["num_train_timesteps"]
    return DiffusersBackend(world.unet, lambda ps: Conditioning(world.text_encoder.encode(ps)),
                            sched.alphas_cumprod, LATENT, decode=decode_latent)


def eval_prompts() -> list[str]:
    """Every shape in every colour: the prompts the world's quality is judged on."""
    return [f"a {c} {s}" for s in data.SHAPES for c in data.COLOUR_NAMES]
