"""The loader under fuzzing: every mutant of a valid SPM loads (and is usable) or raises an SPMError.

Mutants are generated at test time from a fixed seed (lib_spm/tools/fuzz.py, the same generator as
``python -m lib_spm bench fuzz``), from the built-in seeds plus files written by the runtime tests'
``random_spm`` and the original trainer's writer on tiny models. Special files and sparse
gigabyte files check that nothing blocks and nothing reads what it does not use.
"""

from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import torch
from models import tiny_sd1
from spm_helpers import random_spm

from lib_spm import SPMError, SPMFormatError, SPMKeyError, SPMShapeError, load_spm
from lib_spm.format.metadata import Slice
from lib_spm.format.zoo import write_zoo_file
from lib_spm.operations.library import SPMLibrary
from lib_spm.tools.cli import main
from lib_spm.tools.fuzz import MUTATORS, big_files, builtin_seeds, mutants, outcome, special_files

PER_MUTATOR = 250  # x 10 mutators: 2,500 files (+400 below), ~30 s on the 2-core box


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[tuple[str, bytes]]:
    folder = tmp_path_factory.mktemp("seeds")
    unet = tiny_sd1(False)
    pack = random_spm(unet, ["cat", "dog"], rank=3, slices=[Slice("cats", ("cat",), 2), Slice("dogs", ("dog",), 1)])
    pack.save(folder / "pack.safetensors", dtype=torch.float16)
    random_spm(unet, ["circle"], rank=2, dialect="ldm_key", seed=3).save(folder / "ldm.safetensors")
    write_zoo_file(folder / "zoo.safetensors", unet, ["van gogh", "picasso"], rank=1, dtype=torch.bfloat16)
    extra = [(p.stem, p.read_bytes()) for p in sorted(folder.iterdir())]
    return builtin_seeds() + extra


def test_every_seed_is_a_valid_spm(seeds, tmp_path):
    for name, blob in seeds:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        assert outcome(path, inspect=False) == "valid", name


@pytest.mark.parametrize("mutator", sorted(MUTATORS))
def test_mutants_load_or_raise_a_typed_error(seeds, tmp_path, mutator):
    path = tmp_path / "mutant.safetensors"
    counts: Counter = Counter()
    bad = []
    for m in mutants(seeds, PER_MUTATOR, seed=0, only=mutator):
        path.write_bytes(m.data)
        result = outcome(path, inspect=False)
        counts[result] += 1
        if result.startswith("untyped:"):
            bad.append((m.index, m.seed_name, result))
    assert not bad, f"{len(bad)} untyped outcomes, first: {bad[:5]}"
    # the mutator does break files (otherwise this test proves nothing)
    assert sum(n for k, n in counts.items() if k != "valid") >= PER_MUTATOR // 4, counts


def test_the_corpus_reaches_every_error_class(seeds, tmp_path):
    path = tmp_path / "m.safetensors"
    seen = set()
    for m in mutants(seeds, 400, seed=1):
        path.write_bytes(m.data)
        seen.add(outcome(path, inspect=False))
    assert {"valid", "SPMFormatError", "SPMKeyError", "SPMShapeError", "SPMValueError"} <= seen, seen


def test_mutants_are_reproducible(seeds):
    a = [m.data for m in mutants(seeds, 30, seed=7)]
    b = [m.data for m in mutants(seeds, 30, seed=7)]
    c = [m.data for m in mutants(seeds, 30, seed=8)]
    assert a == b and a != c


# -- special files: refused from stat, never opened for reading -----------------------------------

def test_special_files_are_refused_unopened(tmp_path, capsys):
    files = special_files(tmp_path)
    assert set(files) >= {"fifo", "socket", "directory", "dev_zero", "dev_null", "dangling", "symlink_loop"}
    for kind, path in files.items():
        with pytest.raises(SPMFormatError) as info:
            load_spm(path)  # a FIFO opened for reading would block here forever
        assert path.name in str(info.value) and "\n" not in str(info.value), kind
        assert main(["inspect", str(path), "--json"]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("error: "), (kind, out.err)
    with pytest.raises(SPMFormatError):
        load_spm(tmp_path / "nul\x00byte.safetensors")  # os.stat raises ValueError for these


# -- memory: gigabyte files are judged from their headers -----------------------------------------

def _peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        try:
            result = fn()
        except SPMError as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind,error,words", [
    ("trailing_zeros", SPMFormatError, "follow the last tensor"),
    ("checkpoint", SPMKeyError, "unknown key"),
    ("huge_tensor", SPMShapeError, "larger than the largest UNet weight"),
])
def test_gigabyte_files_are_refused_from_their_header(tmp_path, kind, error, words):
    path = big_files(tmp_path, builtin_seeds()[0][1])[kind]
    assert path.stat().st_size > 10 ** 9
    result, peak = _peak(lambda: load_spm(path))
    assert type(result) is error and words in str(result), result
    assert peak < 4 * 2 ** 20, f"{peak} bytes allocated to refuse a header"  # the header is < 1 KB


def test_listing_a_folder_with_a_checkpoint_reads_its_header_only(tmp_path):
    big_files(tmp_path, builtin_seeds()[0][1])["checkpoint"]
    for p in tmp_path.iterdir():
        if p.name != "checkpoint.safetensors":
            p.unlink()
    library = SPMLibrary(tmp_path)
    entries, peak = _peak(library.entries)
    (entry,) = entries
    assert entry.name == "checkpoint" and "unknown key" in entry.error
    assert peak < 32 * 2 ** 20, f"listing allocated {peak} bytes for a 1.1 GB checkpoint"


def test_a_valid_load_reads_about_its_own_size(seeds, tmp_path):
    """Python-side allocations while loading stay within a small multiple of the file size."""
    name, blob = max(seeds, key=lambda s: len(s[1]))
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    load_spm(path)  # warm imports and caches
    spm, peak = _peak(lambda: load_spm(path))
    assert spm.layers and peak < 4 * len(blob) + 2 ** 20, (name, len(blob), peak)


# -- one open per load: no torn reads while another writer swaps versions -------------------------

def test_no_torn_reads_while_the_file_is_replaced(seeds, tmp_path):
    """Targets, tensors and sha256 of each load come from one version even under os.replace."""
    from lib_spm.tools.fuzz import _K

    path = tmp_path / "x.safetensors"
    base = load_spm(_write(tmp_path / "seed.safetensors", seeds[0][1]))
    versions = {}
    for tag, scale in (("a", 1.0), ("b", -2.0)):
        spm = base
        spm.metadata.targets = [f"concept {tag}"]
        spm.layers[_K].down = spm.layers[_K].down.abs() * scale
        out = spm.save(tmp_path / f"{tag}.safetensors")
        versions[tag] = out.read_bytes()
    hashes = {hashlib.sha256(b).hexdigest(): tag for tag, b in versions.items()}
    path.write_bytes(versions["a"])
    stop = threading.Event()

    def swap():
        i = 0
        while not stop.is_set():
            tmp = tmp_path / f".swap{i % 2}.tmp"
            tmp.write_bytes(versions["ab"[i % 2]])
            os.replace(tmp, path)
            i += 1

    writer = threading.Thread(target=swap)
    writer.start()
    try:
        seen = Counter()
        for _ in range(150):
            spm = load_spm(path)
            tag = hashes[spm.sha256]  # a KeyError here: the hash is of no version's bytes
            assert spm.metadata.targets == [f"concept {tag}"]
            assert bool((spm.layers[_K].down > 0).all()) == (tag == "a")
            seen[tag] += 1
    finally:
        stop.set()
        writer.join()
    assert sum(seen.values()) == 150


def _write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path
