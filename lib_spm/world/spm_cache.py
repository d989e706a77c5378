"""Trained SPMs of the shapes world, cached on disk by recipe: training is the costly part of
every world benchmark, and the same (concept, recipe, seed, trainer code) gives the same SPM."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..format.spm_file import SPMFile, load_spm
from .erasure import WORLD_RECIPE, train_concept
from .pipeline import WorldPipeline


def recipe_key(concept: str, seed: int, recipe: dict) -> str:
    """A file-name-safe key: the concept, and a hash of the recipe, seed and the trainer's code
    (a change to the trainer must not silently reuse SPMs it would no longer produce)."""
    from ..training import trainer

    code = hashlib.sha256(Path(trainer.__file__).read_bytes()).hexdigest()
    blob = json.dumps({"concept": concept, "seed": seed, "recipe": recipe, "trainer": code}, sort_keys=True)
    safe = "".join(ch if ch.isalnum() else "_" for ch in concept)
    return f"erase_{safe}_{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def cached_spm(pipe: WorldPipeline, concept: str, work: str | Path, *, seed: int = 0, recipe: dict | None = None,
               progress: bool = False, log=print) -> SPMFile:
    """The SPM erasing ``concept`` under ``recipe`` (default: the world recipe), trained once per key."""
    recipe = {**WORLD_RECIPE, **(recipe or {})}
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{recipe_key(concept, seed, recipe)}.safetensors"
    if path.exists():
        return load_spm(path)
    log(f"training erase_{concept} ({recipe['iterations']} iterations) -> {path}")
    tmp = path.with_name(path.stem + ".partial.safetensors")
    spm = train_concept(pipe, concept, tmp, seed=seed, progress=progress, **recipe)
    tmp.replace(path)  # only a finished training is ever found under the key
    return load_spm(path)
