"""The Train panel's handlers, without gradio, on the shipped shapes world (a few steps per run)."""

from __future__ import annotations

import html
import threading
from contextlib import contextmanager

import numpy as np
import pytest

from lib_spm import load_spm
from lib_spm.operations.library import SPMLibrary
from lib_spm.training.jobs import JobRunner
from lib_spm.training.presets import PRESETS
from lib_spm.training.train_config import read_checkpoint
from lib_spm.ui.train import NO_RESUME, TrainPanel, concepts_text, loss_points, parse_surrogates, split_concepts
from lib_spm.world.model import load_world
from lib_spm.world.pipeline import world_backend

WAIT = 120


@pytest.fixture(scope="module")
def world():
    return load_world()


class Host:
    """The UIHost parts the Train panel uses, over the shapes world."""

    def __init__(self, world, root):
        self.library = SPMLibrary(root)
        self.world = world
        self.jobs = JobRunner()
        self.gate = threading.Event()
        self.gate.set()
        self.interrupt = threading.Event()
        self.progressed, self.titles, self.resolutions = [], [], []
        self.interrupt_at = None

    def model_arch(self):
        return None

    def backend(self, resolution):
        self.resolutions.append(resolution)
        return world_backend(self.world)

    @contextmanager
    def job(self, title):
        self.titles.append(title)
        assert self.gate.wait(WAIT)
        yield

    def interrupted(self):
        return self.interrupt.is_set()

    def progress(self, done, total, text):
        self.progressed.append(done)
        if done == self.interrupt_at:
            self.interrupt.set()  # the user presses the host's Interrupt button


def frame(steps, losses):
    return {"step": steps, "loss": losses}


@pytest.fixture()
def host(world, tmp_path):
    return Host(world, tmp_path / "spm")


@pytest.fixture()
def panel(host):
    return TrainPanel(host, host.jobs, poll=0.05, frame=frame)


def inputs(**kw) -> dict:
    base = dict(preset="shapes world quick", targets="circle", surrogates="", guidance=5.0, iterations=3,
                lr=1e-2, rank=1, la_strength=100.0, anchors=1, sampling="fresh", resolution=32, seed=2,
                name="no_circle", checkpoint_every=0, preview_every=0, preview_prompt="", resume=NO_RESUME)
    base.update(kw)
    return base


def drain(gen, timeout=WAIT) -> list:
    """Every yield of a handler, consumed in a thread so that a hang fails the test instead of CI."""
    out, error = [], []

    def consume():
        try:
            out.extend(gen)
        except BaseException as e:  # pragma: no cover - surfaced below
            error.append(e)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "handler did not finish in time"
    if error:
        raise error[0]
    return out


def start(panel, changed="old", **kw) -> list:
    return drain(panel.start(**inputs(**kw), changed=changed))


@pytest.mark.parametrize("bad,message", [
    (dict(targets=" , "), "at least one target"),
    (dict(iterations=0), "Iterations must be at least 1"),
    (dict(iterations=2.5), "whole number"),
    (dict(lr="fast"), "Learning rate must be a number"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(resolution=100), "multiple of 8"),
    (dict(targets="circle, square", surrogates="a, b, c"), "one per target: 2 targets, 3 surrogates"),
    (dict(name=""), "give the SPM a name"),
    (dict(name="../outside"), "'..' part"),
    (dict(anchors=-1), "Anchor count must be at least 0"),
    (dict(resume="ghost.ckpt.safetensors"), "no training checkpoint"),
    (dict(sampling="lazy"), "sampling must be one of fresh, pool, not 'lazy'"),
    (dict(sampling=None), "sampling must be one of fresh, pool, not None"),
])
def test_bad_inputs_start_nothing(panel, host, bad, message):
    out = start(panel, **bad)
    assert len(out) == 1
    status, plot, previews, changed = out[0]
    assert "Not started" in status and html.escape(message) in status and "spm-error" in status
    assert plot is None and previews == [] and changed == "old"  # nothing for the other panels to refresh
    assert host.jobs.current() is None and host.titles == []


def test_start_trains_to_the_end_and_signals_the_other_panels(panel, host):
    out = start(panel, preview_every=2, preview_prompt="a red circle\na blue square")
    status, plot, previews, changed = out[-1]
    assert "<b>done</b>" in status and "step 3/3" in status and "no_circle.safetensors" in status
    assert changed not in ("old", "") and changed.isdigit()  # a new token: Manage refreshes
    assert all(o[3] == "old" for o in out[:-1])
    assert plot["step"] == [1, 2, 3] and len(plot["loss"]) == 3
    assert [c for _, c in previews] == ["a red circle: before", "a blue square: before", "a red circle: step 2",
                                        "a blue square: step 2", "a red circle: step 3", "a blue square: step 3"]
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im, _ in previews)
    spm = load_spm(host.library.path_of("no_circle"))
    recipe = spm.metadata.recipe
    assert spm.metadata.targets == ["circle"] and spm.metadata.name == "no_circle"
    assert recipe["templates"] == ["{}", "a {}"] and recipe["warmup"] == 10  # the rest comes from the preset
    assert recipe["iterations"] == 3 and recipe["seed"] == 2 and recipe["anchors"] == 1
    assert host.progressed == [1, 2, 3] and host.resolutions == [32] and host.titles == ["Train SPM no_circle"]
    again = start(panel)  # the name is taken now
    assert "exists; choose another name" in again[0][0]


def test_surrogates_and_concept_lists():
    assert split_concepts("a, b ,, c") == ["a", "b", "c"]
    assert split_concepts("red disc, large\nsquare") == ["red disc, large", "square"]
    assert parse_surrogates("", ["a", "b"]) == {}
    assert parse_surrogates("x", ["a", "b"]) == {"a": "x", "b": "x"}
    assert parse_surrogates("x, ", ["a", "b"]) == {"a": "x"}
    for concepts in (["a", "b"], ["red disc, large", "square"]):
        assert split_concepts(concepts_text(concepts)) == concepts


def test_one_job_at_a_time_cancel_and_watch(panel, host):
    host.gate.clear()  # the host's job slot is busy: the first job waits in it
    first = {}
    t = threading.Thread(target=lambda: first.update(out=start(panel, iterations=50, checkpoint_every=0)), daemon=True)
    t.start()
    for _ in range(200):
        if host.jobs.current() is not None:
            break
        threading.Event().wait(0.05)
    assert host.jobs.current() is not None
    second = start(panel, name="other")
    assert "already training (no_circle" in second[0][0] and host.jobs.current().cfg.name == "no_circle"
    watched = []
    w = threading.Thread(target=lambda: watched.extend(drain(TrainPanel(host, host.jobs, poll=0.05,
                                                                        frame=frame).watch("tok"))), daemon=True)
    w.start()  # a reloaded page re-attaches to the running job
    host.gate.set()
    for _ in range(2000):
        if host.progressed:
            break
        threading.Event().wait(0.01)
    assert panel.cancel().startswith("Cancelling")
    t.join(WAIT)
    w.join(WAIT)
    assert not t.is_alive() and not w.is_alive()
    status = first["out"][-1][0]
    assert "<b>cancelled</b>" in status and "no_circle.ckpt.safetensors" in status and "step 50/50" not in status
    assert watched and watched[-1][0] == status and watched[-1][3] != "tok"
    assert panel.cancel() == "No training job is running."


def test_watch_without_a_job():
    panel = TrainPanel(Host(None, "/nonexistent"), poll=0.05, frame=frame)
    out = drain(panel.watch("tok"))
    assert out == [("No training job has run since the UI started.", None, [], "tok")]
    assert panel.resume_choices() == [NO_RESUME]


def test_interrupt_then_resume_from_the_listed_checkpoint(panel, host):
    host.interrupt_at = 2
    out = start(panel, iterations=4)
    assert "<b>cancelled</b>" in out[-1][0] and "interrupted at step 2/4" in out[-1][0]
    host.interrupt.clear()
    assert panel.resume_choices() == [NO_RESUME, "no_circle.ckpt.safetensors"]
    assert panel.on_resume(NO_RESUME, *range(11)) is None
    shown = panel.on_resume("no_circle.ckpt.safetensors", *[None] * 11)
    fields = dict(zip(["targets", "surrogates", "guidance", "iterations", "lr", "rank", "la_strength", "anchors",
                       "sampling", "seed", "name"], shown[:-1]))
    assert fields == dict(targets="circle", surrogates="", guidance=5.0, iterations=4, lr=1e-2, rank=1,
                          la_strength=100.0, anchors=1, sampling="fresh", seed=2, name="no_circle")
    assert "at step 2" in shown[-1]
    bad = start(panel, iterations=4, lr=2e-2, resume="no_circle.ckpt.safetensors")
    assert "these differ: lr" in bad[0][0]
    done = start(panel, **fields, resume="no_circle.ckpt.safetensors", checkpoint_every=2)
    assert "<b>done</b>" in done[-1][0] and "step 4/4" in done[-1][0]
    cfg, step = read_checkpoint(host.library.path_of("no_circle").with_name("no_circle.ckpt.safetensors"))
    assert step == 4 and cfg.name == "no_circle"
    too_few = start(panel, **{**fields, "iterations": 4}, resume="no_circle.ckpt.safetensors")
    assert "set Iterations above 4" in too_few[0][0]


def test_presets_fill_the_fields(panel):
    out = panel.on_preset("civitai: SDXL", "", "")
    assert out[0] == PRESETS["civitai: SDXL"].description
    assert out[1:] == ("bikini", "turtleneck", 2.0, 5000, 2e-4, 2, 400.0, 1, "fresh", 1024)
    kept = panel.on_preset("original: character", "snoopy", "dog")
    assert kept[1:3] == ("snoopy", "dog") and kept[3:] == (1.0, 3000, 1e-4, 1, 1000.0, 4, "fresh", 512)
    assert panel.on_preset(None, "a", "b") == ("", "a", "b") + (None,) * 8  # one per shown field and resolution


def test_loss_points_are_bounded_and_end_at_the_last_step():
    steps, values = loss_points(3100, [1.0] * 50 + [3.0] * 2950, max_points=500)
    assert len(steps) <= 500 and steps[-1] == 3100 and steps[0] > 100
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(3.0)
    assert loss_points(5, [0.5, 0.25]) == ([4, 5], [0.5, 0.25])


class ModelHost(Host):
    """A host with a full-size model of ``arch`` loaded on ``device``."""

    def __init__(self, world, root, arch, device):
        super().__init__(world, root)
        self.arch, self.device = arch, device

    def model_arch(self):
        return self.arch

    def device_type(self):
        return self.device


def test_estimate_before_the_run_starts(panel, world, tmp_path):
    world_text = panel.on_estimate("shapes world quick", 250, 4, 32)
    # 20 denoising + 6 frozen + 4 x 5 adapter pass-equivalents = 46 per iteration; 0.565 s measured
    assert world_text.startswith("Estimated duration: about 2:21 (250 iterations × ~46 UNet passes (fresh sampling)")
    assert "the shapes world, measured" in world_text
    sdxl = TrainPanel(ModelHost(world, tmp_path / "x", "sdxl", "cuda"), JobRunner())
    text = sdxl.on_estimate("civitai: SDXL", 5000, 1, 1024)
    # 20 + 3 + 4 x 2 = 31 passes x (0.03 s x 1.25 x (1024/512)^2 = 0.15 s) x 5000 = 23250 s
    assert text.startswith("Estimated duration: about 6:27:30 (5000 iterations × ~31 UNet passes (fresh sampling) × "
                           "0.15 s")
    assert "SDXL at 1024 px on CUDA, rough, not measured" in text
    assert "about 1:36:52 " in sdxl.on_estimate("civitai: SDXL", 5000, 1, 512)  # a quarter of the pixels
    cpu = TrainPanel(ModelHost(world, tmp_path / "y", "sd1", "cpu"), JobRunner())
    assert "SD1 at 512 px on CPU, measured" in cpu.on_estimate("original: character", 10, 4, 512)
    for bad in ((0, 1, 1024), ("x", 1, 1024), (10, -1, 1024), (10, 1, None)):
        assert sdxl.on_estimate("civitai: SDXL", *bad) == ""


def test_defaults_follow_the_loaded_architecture(panel, world, tmp_path):
    assert panel.default_preset() == "shapes world quick"  # the world is none of sd1/sd2/sdxl
    assert panel.on_preset("original: character", "", "")[-1] == 512  # the preset's own resolution
    for arch, preset, res in (("sdxl", "civitai: SDXL", 1024), ("sd1", "original: character", 512),
                              ("sd2", "original: character", 512)):
        p = TrainPanel(ModelHost(world, tmp_path / arch, arch, "cuda"), JobRunner())
        assert p.default_preset() == preset
        assert p.on_preset("original: character", "", "")[-1] == res
        assert p.on_preset("civitai: SDXL", "", "")[-1] == res  # an SDXL preset on SD1 trains at 512


def test_estimate_follows_the_sampling_and_what_it_costs(panel):
    fresh = panel.on_estimate("shapes world quick", 250, 4, 32, "fresh", "circle", "")
    pool = panel.on_estimate("shapes world quick", 250, 4, 32, "pool", "circle", "")
    # pool: 14 trajectories x 40 passes / 250 = 2.24 + 1 frozen target + 4 anchors + 5 live + 15 backward
    assert "~46 UNet passes (fresh sampling)" in fresh and "~27 UNet passes (pool sampling)" in pool
    assert "about 1:24 " in pool  # 250 x 27.24 passes x (0.565 s / 46 passes) = 83.6 s
    # a named surrogate costs pool one frozen pass per iteration ("" comes with the trajectories)
    assert "~28 UNet passes (pool sampling)" in panel.on_estimate("shapes world quick", 250, 4, 32, "pool", "circle",
                                                                  "square")
    assert "~46 UNet passes" in panel.on_estimate("shapes world quick", 250, 4, 32, "fresh", "circle", "square")
    assert panel.on_estimate("shapes world quick", 250, 4, 32, "lazy") == ""


def _tiny_backend():
    from diffusers import DDPMScheduler
    from models import ToyEncoder, tiny_sd1

    from lib_spm.hosts.diffusers import DiffusersBackend
    from lib_spm.training.trainer import Conditioning

    acp = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    enc = ToyEncoder()
    return DiffusersBackend(tiny_sd1(True), lambda ps: Conditioning(enc.encode(ps)), acp, (4, 8, 8))


@pytest.mark.parametrize("fields", [
    dict(sampling="fresh", max_denoising_steps=4, iterations=8, batch=2),
    dict(sampling="fresh", max_denoising_steps=3, iterations=4, la_strength=0.0),  # no anchors
    dict(sampling="pool", max_denoising_steps=4, iterations=7),  # refills of 2 trajectories, then 1
    dict(sampling="pool", max_denoising_steps=5, iterations=5, batch=2, surrogates={"circle": "square"}),
    dict(sampling="pool", max_denoising_steps=3, iterations=6, la_strength=0.0),
])
def test_estimate_counts_the_passes_the_trainer_reports(tmp_path, fields):
    from lib_spm.training.cost import sample_passes_per_iteration
    from lib_spm.training.train_config import TrainConfig
    from lib_spm.training.trainer import train_spm
    from lib_spm.ui.train import BACKWARD_PASSES, passes_per_iteration

    recipe = {**dict(targets=["circle"], iterations=5, anchors=2, la_strength=10.0, lr=1e-3, seed=1), **fields}
    cfg = TrainConfig(**recipe)
    res = train_spm(_tiny_backend(), cfg, tmp_path / "x.safetensors")
    reported = [h.passes for h in res.history]
    expected = sample_passes_per_iteration(cfg)
    k, b, s = (cfg.anchors if cfg.la_strength > 0 else 0), cfg.batch, cfg.max_denoising_steps
    # the UI's estimate is the trainer's count plus the backward through the adapter's rows
    assert passes_per_iteration(recipe) == expected + BACKWARD_PASSES * (1 + k) * b
    if cfg.sampling == "pool":  # deterministic: the run's mean, as bench erasure reports it
        assert expected == pytest.approx(sum(reported) / len(reported), abs=1e-9)
    else:  # 2*B*idx denoising passes, idx uniform in [1, S-1]: the estimate counts its mean, S/2
        steps = {(r - (expected - b * s)) / (2 * b) for r in reported}
        assert steps == set(range(1, s))  # every step seen (seeded), none outside the range


def test_pool_sampling_is_trained_recorded_and_resumed(panel, host):
    host.interrupt_at = 2
    out = start(panel, sampling="pool", iterations=4)
    assert "interrupted at step 2/4" in out[-1][0]
    host.interrupt.clear()
    shown = panel.on_resume("no_circle.ckpt.safetensors", *[None] * 11)
    assert shown[8] == "pool"  # the Sampling choice is filled from the checkpoint
    fresh = start(panel, sampling="fresh", resume="no_circle.ckpt.safetensors")
    assert "these differ: sampling" in fresh[0][0]
    done = start(panel, sampling="pool", iterations=4, resume="no_circle.ckpt.safetensors")
    assert "<b>done</b>" in done[-1][0]
    assert load_spm(host.library.path_of("no_circle")).metadata.recipe["sampling"] == "pool"
