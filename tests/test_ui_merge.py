"""The Merge panel's handlers, without gradio: checked requests, exact and compressed packs that
land in the library, baking into a tiny LDM-style checkpoint, and refusals shown as messages."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from models import tiny_sd1
from spm_helpers import random_spm

from lib_spm import SPMValueError
from lib_spm.format.metadata import SPMMetadata
from lib_spm.format.safetensors_io import read_file, write_file
from lib_spm.format.spm_file import LayerWeights, SPMFile
from lib_spm.operations.library import SPMLibrary
from lib_spm.ui import merge as panel


class Host:
    """A UIHost over a folder: the job slot is a lock, checkpoints are files in ``ckpt``."""

    def __init__(self, root: Path, loaded: str | None = None, arch: str | None = None):
        self.library = SPMLibrary(root / "spm")
        self.ckpt = root / "ckpt"
        self.ckpt.mkdir(exist_ok=True)
        self.loaded, self.arch = loaded, arch
        self.lock = threading.Lock()
        self.jobs: list[str] = []
        self.steps: list[tuple[int, int, str]] = []

    @contextmanager
    def job(self, title):
        with self.lock:
            self.jobs.append(title)
            yield

    def progress(self, done, total, text):
        self.steps.append((done, total, text))

    def model_arch(self):
        return self.arch

    def checkpoints(self):
        return {p.name: p for p in sorted(self.ckpt.glob("*.safetensors"))}

    def loaded_checkpoint(self):
        return self.loaded

    def checkpoint_dir(self):
        return self.ckpt


@pytest.fixture()
def host(tmp_path):
    h = Host(tmp_path)
    model = tiny_sd1(False)
    h.library.save(random_spm(model, ["circle"], rank=1, seed=1, name="a"), "a")
    h.library.save(random_spm(model, ["square"], rank=2, alpha=0.5, seed=2, name="b"), "b")
    h.library.save(random_spm(model, ["star"], rank=3, alpha=3.0, seed=3, name="c"), "sub/c")
    return h


def last(events):
    events = list(events)
    assert events, "the handler yielded nothing"
    return events[-1]


def test_weights_by_name_by_position_and_default():
    names = ["a", "b", "sub/c"]
    assert panel.parse_weights("", names) == [("a", 1.0), ("b", 1.0), ("sub/c", 1.0)]
    assert panel.parse_weights("b: 0.5\nsub/c: -1", names) == [("a", 1.0), ("b", 0.5), ("sub/c", -1.0)]
    assert panel.parse_weights("0.2, 0.3", names) == [("a", 0.2), ("b", 0.3), ("sub/c", 1.0)]
    assert panel.parse_weights("a: 2, 0.3", names) == [("a", 2.0), ("b", 0.3), ("sub/c", 1.0)]
    for bad, why in [("x: 1", "not among"), ("a: one", "must be a number"), ("a: nan", "finite"),
                     ("a: 1, a: 2", "two weights"), ("1, 2, 3, 4", "plain weights")]:
        with pytest.raises(SPMValueError, match=why):
            panel.parse_weights(bad, names)


def test_exact_merge_lands_in_the_library_with_its_slices(host):
    events = list(panel.run(host, ["a", "b"], "b: 0.5", panel.EXACT, 4, 0.05, None, "pack"))
    text, token = events[-1]
    assert token is not None and token.isdigit(), text
    assert all(t is None for _, t in events[:-1])
    assert "pack" in panel.spm_choices(host) and host.jobs == ["SPM merge"]
    assert "rank 3" in text and "KiB" in text and "a, b" in text
    pack = host.library.load("pack")
    assert pack.rank == 3 and [s.name for s in pack.slices()] == ["a", "b"]
    a, b = host.library.load("a"), host.library.load("b")
    k = next(iter(a.layers))
    want = a.layers[k].delta() + 0.5 * b.layers[k].delta()
    assert torch.allclose(pack.layers[k].delta(), want, atol=1e-6)
    assert host.steps[-1][0] == host.steps[-1][1]  # progress reached its total


def test_compressed_to_rank_and_budget_report_the_error(host):
    text, token = last(panel.run(host, ["a", "b", "sub/c"], "", panel.RANK, 2, None, None, ""))
    assert token and "rank 2" in text and "Relative error" in text
    (name,) = [n for n in panel.spm_choices(host) if n.endswith("_compressed")]
    assert name == "a+b+c_compressed" and host.library.load(name).rank == 2
    err = float(text.split("Relative error ")[1].split()[0])
    assert 0 < err < 1
    text, token = last(panel.run(host, ["a", "b", "sub/c"], "", panel.RANK, 2, None, None, ""))
    assert token and "a+b+c_compressed-1" in panel.spm_choices(host)  # default names never collide
    text, token = last(panel.run(host, ["a", "b"], "", panel.BUDGET, None, 0.0, None, "lossless"))
    assert token and host.library.load("lossless").rank == 3
    assert "Relative error 0.0000" in text


@pytest.mark.parametrize("args, why", [
    (([], "", panel.EXACT, 4, 0.05, None, "x"), "select at least one"),
    ((["a"], "", panel.EXACT, 4, 0.05, None, "x"), "at least two"),
    ((["a", "zzz"], "", panel.EXACT, 4, 0.05, None, "x"), "no SPM named 'zzz'"),
    ((["a", "b"], "a: x", panel.EXACT, 4, 0.05, None, "x"), "must be a number"),
    ((["a", "b"], "", panel.EXACT, 4, 0.05, None, "../x"), r"'\.\.' part"),
    ((["a", "b"], "", panel.EXACT, 4, 0.05, None, "a"), "already exists"),
    ((["a", "b"], "", panel.RANK, 0, 0.05, None, "x"), "rank must be"),
    ((["a", "b"], "", panel.BUDGET, 4, 1.5, None, "x"), "error budget"),
    ((["a", "b"], "", panel.BAKE, 4, 0.05, None, "x"), "no checkpoint is loaded"),
])
def test_refusals_are_one_message_and_write_nothing(host, args, why):
    before = sorted(p.name for p in host.library.root.rglob("*"))
    events = list(panel.run(host, *args))
    assert len(events) == 1 and events[0][1] is None
    assert events[0][0].startswith("Error: ")
    assert __import__("re").search(why, events[0][0]), events[0][0]
    assert sorted(p.name for p in host.library.root.rglob("*")) == before and host.jobs == []


def test_mixed_architectures_are_refused_by_the_core(host):
    model = tiny_sd1(False)
    xl = random_spm(model, ["x"], seed=9, name="xl")
    xl.metadata.arch = "sdxl"
    one = random_spm(model, ["y"], seed=8, name="one")
    one.metadata.arch = "sd1"
    host.library.save(xl, "xl")
    host.library.save(one, "one")
    text, token = last(panel.run(host, ["one", "xl"], "", panel.EXACT, 4, 0.05, None, "mixed"))
    assert token is None and text.startswith("Error: ") and "different architectures" in text
    assert not host.library.exists("mixed")


def _sd1_checkpoint_and_spm(folder: Path, seed: int = 0):
    """A few full-size sd1 layers as an LDM single-file checkpoint, and an sd1 SPM over them."""
    from lib_spm.format import archs
    from lib_spm.format.names import layer_names, spm_layer_paths

    ref = archs.reference_unet("sd1")
    names = layer_names(ref)
    g = torch.Generator().manual_seed(seed)
    layers, ckpt = {}, {"model.diffusion_model.out.2.bias": torch.randn(4, generator=g).half()}
    for p in spm_layer_paths(ref)[:2]:
        w = tuple(ref.get_submodule(p).weight.shape)
        up = torch.randn(w[0], 1, *([1, 1] if len(w) == 4 else []), generator=g)
        layers[names[p].key] = LayerWeights(torch.randn(1, *w[1:], generator=g) * 0.05, up * 0.05, 1.0)
        ckpt[f"model.diffusion_model.{names[p].ldm}.weight"] = torch.randn(w, generator=g).half()
    write_file(folder / "base.safetensors", ckpt, {"note": "kept"})
    return SPMFile(layers, SPMMetadata(targets=["x"], arch="sd1", name="x")), ckpt


def test_bake_into_the_loaded_or_a_chosen_checkpoint_never_overwrites(host):
    spm, ckpt = _sd1_checkpoint_and_spm(host.ckpt)
    host.library.save(spm, "x")
    before = (host.ckpt / "base.safetensors").read_bytes()
    host.loaded = "base.safetensors"
    assert panel.checkpoint_choices(host) == [panel.LOADED, "base.safetensors"]
    text, token = last(panel.run(host, ["x"], "x: 0.5", panel.BAKE, None, None, panel.LOADED, "baked"))
    assert token and "baked.safetensors" in text and "loses Facilitated Transport" in text
    out, md = read_file(host.ckpt / "baked.safetensors")
    assert md == {"note": "kept"} and (host.ckpt / "base.safetensors").read_bytes() == before
    key, lw = next(k for k in ckpt if k.endswith(".weight")), next(iter(spm.layers.values()))
    assert torch.equal(out[key], (ckpt[key].float() + 0.5 * lw.delta()).half())
    # a second bake with the same name is refused before any work; an empty name picks a new one
    text, token = last(panel.run(host, ["x"], "", panel.BAKE, None, None, "base.safetensors", "baked"))
    assert token is None and "already exists" in text
    host.loaded = None
    text, token = last(panel.run(host, ["x"], "", panel.BAKE, None, None, "base.safetensors", ""))
    assert token and (host.ckpt / "base_x.safetensors").exists()
    text, token = last(panel.run(host, ["x"], "", panel.BAKE, None, None, "base.safetensors", ""))
    assert token and (host.ckpt / "base_x-1.safetensors").exists()
    for bad in ("../evil", "sub/evil", "base"):
        text, token = last(panel.run(host, ["x"], "", panel.BAKE, None, None, "base.safetensors", bad))
        assert token is None and text.startswith("Error: "), bad
    assert not (host.ckpt.parent / "evil.safetensors").exists()
    assert (host.ckpt / "base.safetensors").read_bytes() == before


def test_bake_without_a_known_architecture_fails_in_the_worker_with_a_message(host):
    _sd1_checkpoint_and_spm(host.ckpt)
    text, token = last(panel.run(host, ["a"], "", panel.BAKE, None, None, "base.safetensors", "wrong"))
    assert token is None and text.startswith("Error: ") and "architecture" in text.lower()
    assert not (host.ckpt / "wrong.safetensors").exists() and host.jobs == ["SPM merge"]


def test_choices_follow_the_folder(host):
    assert panel.spm_choices(host) == ["a", "b", "sub/c"]
    host.library.delete("b")
    (host.library.root / "broken.safetensors").write_bytes(b"not a safetensors file")
    choices, kept = panel.refreshed(host, ["a", "b"])
    assert choices == ["a", "sub/c"] and kept == ["a"]
    assert panel.options_visible(panel.RANK) == (True, False, False)
    assert panel.options_visible(panel.BAKE) == (False, False, True)


def test_a_busy_job_slot_is_reported_not_frozen(host):
    host.lock.acquire()
    events = panel.run(host, ["a", "b"], "", panel.EXACT, 4, 0.05, None, "later")
    seen = [next(events) for _ in range(3)]
    assert any("waiting for the running job" in text for text, _ in seen)
    host.lock.release()
    text, token = last(events)
    assert token and host.library.exists("later")
