"""``python -m lib_spm demo --out DIR [--concept circle]``: erase a concept from the shipped shapes
world on CPU in a few minutes, and show and count what changed.

Writes DIR/erase_<concept>.safetensors (the SPM, trained data-free), DIR/grid.png (rows: target
prompts without / with the SPM, then other prompts without / with it) and DIR/metrics.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import SPMValueError


def run_demo(out_dir: str | Path, concept: str = "circle", *, n: int = 8, iterations: int | None = None,
             seed: int = 0) -> dict:
    from ..progress import Progress
    from ..world import data
    from ..world.bench_erasure import GATES
    from ..world.erasure import WORLD_RECIPE, measure, other_prompts, target_prompts, train_concept
    from ..world.model import load_world
    from ..world.pipeline import WorldPipeline

    if concept not in data.SHAPES:
        raise SPMValueError(f"the shapes world knows {', '.join(data.SHAPES)}; not {concept!r}")
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = WorldPipeline(load_world())
    spm_path = out / f"erase_{concept}.safetensors"
    spm_path.unlink(missing_ok=True)
    extra = {} if iterations is None else {"iterations": iterations}
    spm = train_concept(pipe, concept, spm_path, seed=seed, progress=True, **extra)
    train_seconds = time.time() - t0
    targets, others = target_prompts(concept), other_prompts([concept])
    cache: dict = {}
    results = {}
    checks = Progress(f"demo: generating and judging {n} samples per prompt", len(GATES) + 1)
    for label, gate in GATES.items():
        checks.advance(0, note=f"gate {label}")
        m = measure(pipe, [(spm, 1.0)], targets, others, gate=gate, n=n, seed=seed, base_cache=cache)
        checks.advance(note=f"gate {label} done")
        results[label] = {"erase_rate": round(m.erase_rate, 4), "preservation": round(m.preservation, 4),
                          "other_accuracy": round(m.other_accuracy, 4),
                          "base_other_accuracy": round(m.base_other_accuracy, 4)}
    _save_grid(out / "grid.png", pipe, spm, concept)
    checks.advance(note="grid.png written")
    metrics = {
        "concept": concept,
        "erase_rate": results["calibrated"]["erase_rate"],
        "preservation": results["calibrated"]["preservation"],
        "seconds": round(time.time() - t0, 1),
        "training_seconds": round(train_seconds, 1),
        "samples_per_prompt": n,
        "facilitated_transport": results,  # off / published gate / calibrated gate (the headline)
        "recipe": {**WORLD_RECIPE, **extra},
        "spm_file": str(spm_path),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _save_grid(path: Path, pipe, spm, concept: str, per_row: int = 6) -> None:
    from PIL import Image

    from ..world import data

    colours = data.COLOUR_NAMES[:per_row]
    targets = [f"a {c} {concept}" for c in colours]
    others = [f"a {c} {s}" for c, s in zip(colours, [s for s in data.SHAPES if s != concept] * 2)]
    from ..world.bench_erasure import GATES

    rows = []
    for prompts in (targets, others):
        rows.append(pipe.generate(prompts, seed=7))
        with pipe.applied([(spm, 1.0)], GATES["calibrated"]):
            rows.append(pipe.generate(prompts, seed=7))
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # [3, H*4, W*per_row]
    img = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(path)
