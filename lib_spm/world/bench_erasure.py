"""``python -m lib_spm bench erasure``: erasure quality in the shapes world, every case with a
fixed seed, Facilitated Transport off, published, and calibrated.

Cases: one concept; the same SPM on prompts that only use the concept's synonyms; two SPMs
applied together; the SPM on a fine-tuned variant of the world (model transfer). Also: the gate
values each metric gives target, synonym and unrelated prompts, and the training cost of the
recipe used here next to the original recipe run through the same code.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from ..runtime.gating import GateSettings
from . import data
from .erasure import (
    ORIGINAL_RECIPE,
    SAMPLING_OVERRIDES,
    WORLD_RECIPE,
    measure,
    other_prompts,
    target_prompts,
    train_concept,
    train_concept_run,
    training_cost,
)
from .model import load_world
from .pipeline import WorldPipeline

# Unrelated prompts for calibration: the world's colour and background words without any shape.
WORLD_REFERENCES = ("a red one", "a blue thing on a gray background", "a picture", "a green object",
                    "something yellow", "a purple thing on a white background", "a cyan one on a black background")

GATES = {
    "off": GateSettings(enabled=False),
    "published": GateSettings(metric="clipcos_tokenuni"),
    "calibrated": GateSettings(metric="pooled_tokenuni", reference_prompts=WORLD_REFERENCES),
}
# the facilitate factor doubles calibrated gates: half-way similar prompts get full strength
WITH_X2 = {**GATES, "calibrated x2": GateSettings(metric="pooled_tokenuni", factor=2.0,
                                                   reference_prompts=WORLD_REFERENCES)}


def _row(m) -> dict:
    return {"erase_rate": round(m.erase_rate, 4), "preservation": round(m.preservation, 4),
            "other_accuracy": round(m.other_accuracy, 4), "base_other_accuracy": round(m.base_other_accuracy, 4)}


def gate_table(pipe: WorldPipeline, concept: str, spm) -> dict:
    """The gate each metric opens for target, synonym and unrelated prompts."""
    probes = {
        "target": [f"a {c} {concept}" for c in data.COLOUR_NAMES[:3]] + [concept],
        "synonym": [f"a {c} {w}" for w in data.SYNONYMS[concept] for c in data.COLOUR_NAMES[:2]],
        "unrelated": [f"a {c} {s}" for s in data.SHAPES if s != concept for c in data.COLOUR_NAMES[:2]],
        "empty": [""],
    }
    out = {}
    for gname in ("published", "calibrated", "calibrated x2"):
        out[gname] = {}
        with pipe.applied([(spm, 1.0)], WITH_X2[gname]) as s:
            for kind, prompts in probes.items():
                te = pipe.world.text_encoder
                with torch.no_grad():
                    g = s.gates(te.encode(prompts), te.tokens(prompts))[:, 0]
                out[gname][kind] = {"mean": round(g.mean().item(), 3), "min": round(g.min().item(), 3),
                                    "max": round(g.max().item(), 3)}
    return out


def run(n: int = 16, seed: int = 0, finetune_steps: int = 150, weights: str | None = None,
        iterations: int | None = None, others_every: int = 1, log=print) -> dict:
    """``others_every`` > 1 keeps every k-th non-target prompt (a cheaper run, same seeds)."""
    from .train_world import finetune

    t0 = time.time()
    world = load_world(weights) if weights else load_world()
    extra = {} if iterations is None else {"iterations": iterations}
    pipe = WorldPipeline(world)
    report: dict = {"n_per_prompt": n, "seed": seed, "others_every": others_every, "recipe": WORLD_RECIPE,
                    "world": {k: v for k, v in world.info.items() if k != "eval"}}
    with tempfile.TemporaryDirectory() as d:
        log("training SPMs: circle, star")
        circle = train_concept(pipe, "circle", Path(d) / "circle.safetensors", seed=seed, progress=True, **extra)
        star = train_concept(pipe, "star", Path(d) / "star.safetensors", seed=seed, progress=True, **extra)
    cache: dict = {}
    cases: dict = {}
    others_c = other_prompts(["circle"])[::others_every]
    log("case: one concept")
    cases["one concept (circle)"] = {g: _row(measure(pipe, [(circle, 1.0)], target_prompts("circle"), others_c,
                                                     gate=gs, n=n, seed=seed, base_cache=cache)) for g, gs in WITH_X2.items()}
    log("case: synonyms")
    syn = target_prompts("circle", list(data.SYNONYMS["circle"]))
    cases["synonyms (disc, round shape)"] = {g: _row(measure(pipe, [(circle, 1.0)], syn, others_c, gate=gs, n=n,
                                                             seed=seed, base_cache=cache)) for g, gs in WITH_X2.items()}
    log("case: two SPMs")
    others_cs = other_prompts(["circle", "star"])[::others_every]
    two = {}
    for g, gs in GATES.items():
        single_c = measure(pipe, [(circle, 1.0)], target_prompts("circle"), others_cs, gate=gs, n=n, seed=seed, base_cache=cache)
        single_s = measure(pipe, [(star, 1.0)], target_prompts("star"), others_cs, gate=gs, n=n, seed=seed, base_cache=cache)
        both_c = measure(pipe, [(circle, 1.0), (star, 1.0)], target_prompts("circle"), others_cs, gate=gs, n=n,
                         seed=seed, base_cache=cache)
        both_s = measure(pipe, [(circle, 1.0), (star, 1.0)], target_prompts("star"), [], gate=gs, n=n, seed=seed)
        two[g] = {"circle_single": round(single_c.erase_rate, 4), "star_single": round(single_s.erase_rate, 4),
                  "circle_combined": round(both_c.erase_rate, 4), "star_combined": round(both_s.erase_rate, 4),
                  "circle_kept": round(both_c.erase_rate / max(single_c.erase_rate, 1e-9), 4),
                  "star_kept": round(both_s.erase_rate / max(single_s.erase_rate, 1e-9), 4),
                  "preservation": round(both_c.preservation, 4)}
    cases["two SPMs (circle + star)"] = two
    log(f"case: model transfer (fine-tune {finetune_steps} steps on striped images)")
    tuned = WorldPipeline(finetune(world, finetune_steps))
    tcache: dict = {}
    cases["model transfer (striped fine-tune)"] = {g: _row(measure(tuned, [(circle, 1.0)], target_prompts("circle"), others_c,
                                                                   gate=gs, n=n, seed=seed, base_cache=tcache))
                                                   for g, gs in GATES.items()}
    report["cases"] = cases
    log("gates")
    report["gates_circle"] = gate_table(pipe, "circle", circle)
    log("training cost")
    report["training_cost"] = {"this recipe": training_cost(pipe, WORLD_RECIPE, iterations=iterations or 5),
                               "original recipe": training_cost(pipe, ORIGINAL_RECIPE, iterations=iterations or 5)}
    report["seconds"] = round(time.time() - t0, 1)
    return report


def run_one(n: int = 16, seed: int = 0, samplings=("fresh", "pool"), gates=("calibrated",), others_every: int = 1,
            weights: str | None = None, log=print) -> dict:
    """Only the one-concept case (circle), once per training sampling: erase and preservation
    under ``gates`` next to each training's UNet passes and seconds per iteration."""
    t0 = time.time()
    world = load_world(weights) if weights else load_world()
    pipe = WorldPipeline(world)
    others = other_prompts(["circle"])[::others_every]
    report: dict = {"n_per_prompt": n, "seed": seed, "others_every": others_every, "recipe": WORLD_RECIPE,
                    "world": {k: v for k, v in world.info.items() if k != "eval"}, "samplings": {},
                    "overrides": {s: SAMPLING_OVERRIDES[s] for s in samplings}}
    cache: dict = {}
    with tempfile.TemporaryDirectory() as d:
        for sampling in samplings:
            log(f"training circle ({sampling} sampling)")
            spm, cost = train_concept_run(pipe, "circle", Path(d) / f"circle_{sampling}.safetensors", seed=seed,
                                          progress=True, **SAMPLING_OVERRIDES[sampling])
            row = {"training": cost, "gates": {}}
            for g in gates:
                log(f"measuring {sampling}, gate {g}")
                row["gates"][g] = _row(measure(pipe, [(spm, 1.0)], target_prompts("circle"), others, gate=WITH_X2[g],
                                               n=n, seed=seed, base_cache=cache))
            report["samplings"][sampling] = row
    report["seconds"] = round(time.time() - t0, 1)
    return report


def markdown_one(report: dict) -> str:
    lines = ["| sampling | gate | erase rate | preservation | passes / iteration | s / iteration | training s |",
             "|---|---|---|---|---|---|---|"]
    for sampling, row in report["samplings"].items():
        c = row["training"]
        for g, r in row["gates"].items():
            lines.append(f"| {sampling} | {g} | {r['erase_rate']:.3f} | {r['preservation']:.3f} | "
                         f"{c['passes_per_iteration']:.1f} | {c['seconds_per_iteration']:.3f} | {c['train_seconds']:.0f} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    lines = ["| case | gate | erase rate | preservation |", "|---|---|---|---|"]
    for case, by_gate in report["cases"].items():
        for g, r in by_gate.items():
            if "erase_rate" in r:
                lines.append(f"| {case} | {g} | {r['erase_rate']:.3f} | {r['preservation']:.3f} |")
            else:
                lines.append(f"| {case} | {g} | circle {r['circle_combined']:.3f} ({r['circle_kept']:.0%} of single), "
                             f"star {r['star_combined']:.3f} ({r['star_kept']:.0%} of single) | {r['preservation']:.3f} |")
    return "\n".join(lines)


def publish(report: dict, out_json: str | None, table, extra_keys) -> dict:
    """Print a benchmark's table and headline figures; write the whole report as JSON if asked."""
    if out_json:
        Path(out_json).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(json.dumps({k: report[k] for k in extra_keys}, indent=2))
    return report


def main(out_json: str | None = None, n: int = 16, seed: int = 0, others_every: int = 1, cases: str = "all",
         samplings=("fresh", "pool"), gates=("calibrated",)) -> dict:
    """``cases="one"``: only the one-concept case, trained once per sampling (:func:`run_one`)."""
    if cases == "one":
        return publish(run_one(n=n, seed=seed, samplings=samplings, gates=gates, others_every=others_every), out_json,
                       markdown_one, ("samplings", "seconds"))
    return publish(run(n=n, seed=seed, others_every=others_every), out_json, markdown, ("gates_circle", "training_cost", "seconds"))
