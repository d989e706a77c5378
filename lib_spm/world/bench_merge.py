"""``python -m lib_spm bench merge``: a three-concept moderation pack in the shapes world.

Three SPMs (circle, star, triangle) side by side, as one exact pack, and as a compressed pack,
all with calibrated Facilitated Transport: erase rate per concept and preservation on the two
shapes no SPM targets. Then the world's UNet baked with the three SPMs against runtime
application at gate 1 (max abs difference of the UNet's output).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from ..format.names import resolve
from ..operations.merge import merge_compressed, merge_exact
from ..runtime.gating import GateSettings
from ..runtime.session import Session
from . import data
from .bench_erasure import GATES, publish
from .erasure import measure, target_prompts, train_concept
from .model import LATENT, load_world
from .pipeline import WorldPipeline

CONCEPTS = ("circle", "star", "triangle")


def run(n: int = 16, seed: int = 0, weights: str | None = None, iterations: int | None = None, log=print) -> dict:
    t0 = time.time()
    world = load_world(weights) if weights else load_world()
    pipe = WorldPipeline(world)
    extra = {} if iterations is None else {"iterations": iterations}
    with tempfile.TemporaryDirectory() as d:
        spms = [train_concept(pipe, c, Path(d) / f"{c}.safetensors", seed=seed, **extra) for c in CONCEPTS]
    others = [f"a {c} {s}" for s in data.SHAPES if s not in CONCEPTS for c in data.COLOUR_NAMES]
    exact = merge_exact([(s, 1.0) for s in spms], name="pack")
    small, rep = merge_compressed([(s, 1.0) for s in spms], rank=2, name="pack-r2")
    variants = {"side by side": [(s, 1.0) for s in spms], "exact pack": [(exact, 1.0)],
                f"compressed pack (rank 2, rel. error {rep.overall_error:.3f})": [(small, 1.0)]}
    gate = GATES["calibrated"]
    cache: dict = {}
    table = {}
    for name, applied in variants.items():
        log(f"measuring: {name}")
        row = {}
        for c in CONCEPTS:
            m = measure(pipe, applied, target_prompts(c), others if c == CONCEPTS[0] else [], gate=gate, n=n,
                        seed=seed, base_cache=cache)
            row[f"erase_{c}"] = round(m.erase_rate, 4)
            if c == CONCEPTS[0]:
                row["preservation"] = round(m.preservation, 4)
        table[name] = row
    log("bake vs runtime")
    baked = copy.deepcopy(world.unet)
    with torch.no_grad():
        for key, path in resolve(list(exact.layers), baked).items():
            w = baked.get_submodule(path).weight
            w += exact.layers[key].delta().reshape(w.shape).to(w.dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, *LATENT, generator=g)
    t = torch.linspace(50, 950, 8).long()
    prompts = [f"a {c} {s}" for c, s in zip(data.COLOUR_NAMES, data.SHAPES * 2)] + ["", ""]  # 8 rows
    ctx = world.text_encoder.encode(prompts)
    with torch.no_grad():
        with Session(world.unet, [(s, 1.0) for s in spms], gate=GateSettings(enabled=False)):
            runtime = world.unet(x, t, ctx).sample
        out = baked(x, t, ctx).sample
    bake = {"max_abs_difference": float((out - runtime).abs().max()), "output_scale": float(runtime.abs().max())}
    return {"n_per_prompt": n, "seed": seed, "gate": "calibrated", "table": table, "bake_vs_runtime": bake,
            "compressed_per_layer_error_max": round(max(rep.per_layer_error.values()), 4),
            "seconds": round(time.time() - t0, 1)}


def markdown(report: dict) -> str:
    lines = ["| applied as | erase circle | erase star | erase triangle | preservation |", "|---|---|---|---|---|"]
    for name, r in report["table"].items():
        lines.append(f"| {name} | {r['erase_circle']:.3f} | {r['erase_star']:.3f} | {r['erase_triangle']:.3f} | "
                     f"{r['preservation']:.3f} |")
    return "\n".join(lines)


def main(out_json: str | None = None, n: int = 16, seed: int = 0) -> dict:
    return publish(run(n=n, seed=seed), out_json, markdown, ("bake_vs_runtime", "seconds"))
