"""Training jobs on the shipped shapes world: a few steps each, every wait bounded by a timeout."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from spm_helpers import hook_counts

from lib_spm import SPMRuntimeError, SPMValueError, load_spm
from lib_spm.training.jobs import JobRunner, PreviewSettings, TrainJob, sample_latents, to_uint8
from lib_spm.training.train_config import TrainConfig
from lib_spm.training.trainer import train_spm
from lib_spm.world.model import load_world
from lib_spm.world.pipeline import world_backend
from lib_spm.world.presets import PRESETS, apply_preset

WAIT = 120  # seconds: far above a few CPU steps, low enough that a hang fails instead of stalling CI


@pytest.fixture(scope="module")
def world():
    return load_world()


def cfg(**kw) -> TrainConfig:
    base = dict(targets=["circle"], iterations=4, lr=1e-2, warmup=1, max_denoising_steps=3, anchors=1,
                la_strength=100.0, templates=["{}", "a {}"], guidance=5.0, seed=1, name="no_circle")
    base.update(kw)
    return TrainConfig(**base)


def run(job: TrainJob) -> TrainJob:
    job.start()
    assert job.wait(WAIT), "training job did not finish in time"
    return job


def test_job_runs_to_done_and_writes_a_loadable_spm(world, tmp_path):
    seen = []
    job = run(TrainJob(lambda: world_backend(world), cfg(), tmp_path / "a.safetensors",
                       progress=lambda d, t, text: seen.append((d, t))))
    s = job.snapshot()
    assert s.state == "done" and s.finished and s.error is None, s.message
    assert s.step == s.total == 4 and len(s.losses) == 4 and all(np.isfinite(s.losses))
    assert s.output == tmp_path / "a.safetensors" and s.checkpoint is None and s.eta == 0.0
    assert load_spm(s.output).metadata.recipe["steps_done"] == 4
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert hook_counts(world.unet) == 0


def test_a_job_writes_the_same_bytes_as_train_spm_and_resumes_bit_identically(world, tmp_path):
    """Cancel at step 2 (checkpoint kept), resume to 4: the bytes of one uninterrupted run, previews on
    throughout, so previews never draw from the trainer's random stream."""
    previews = PreviewSettings(["a circle"], every=1, steps=3, guidance=4.0)
    train_spm(world_backend(world), cfg(), tmp_path / "plain.safetensors")
    straight = run(TrainJob(lambda: world_backend(world), cfg(), tmp_path / "straight.safetensors", preview=previews))
    jobs = []
    part = TrainJob(lambda: world_backend(world), cfg(), tmp_path / "resumed.safetensors", preview=previews,
                    progress=lambda done, total, text: done == 2 and jobs[0].cancel())
    jobs.append(part)
    s = run(part).snapshot()
    assert s.state == "cancelled" and s.step == 2 and "cancelled at step 2/4" in s.message
    assert s.checkpoint == tmp_path / "resumed.ckpt.safetensors" and s.checkpoint.exists()
    assert load_spm(s.output).metadata.recipe["steps_done"] == 2  # cancel saves what exists
    resumed = run(TrainJob(lambda: world_backend(world), cfg(), tmp_path / "resumed.safetensors",
                           resume_from=s.checkpoint, preview=previews))
    r = resumed.snapshot()
    assert r.state == "done" and r.step == 4 and len(r.losses) == 2
    final = (tmp_path / "plain.safetensors").read_bytes()
    assert straight.snapshot().output.read_bytes() == final
    assert (tmp_path / "resumed.safetensors").read_bytes() == final


def test_previews_show_before_and_after_images(world, tmp_path):
    prompts = ["a red circle", "a blue square"]
    p = PreviewSettings(prompts, every=2, seed=5, steps=4, guidance=4.0)
    job = run(TrainJob(lambda: world_backend(world), cfg(iterations=5), tmp_path / "p.safetensors", preview=p))
    s = job.snapshot()
    assert s.state == "done", s.message
    captions = [c for c, _ in s.previews]
    assert captions == ["a red circle: before", "a blue square: before", "a red circle: step 2",
                        "a blue square: step 2", "a red circle: step 4", "a blue square: step 4",
                        "a red circle: step 5", "a blue square: step 5"]  # every 2 steps, and the end
    for _, im in s.previews:
        assert im.shape == (32, 32, 3) and im.dtype == np.uint8 and not im.flags.writeable
    be = world_backend(world)
    with torch.no_grad():
        base = to_uint8(be.decode(sample_latents(be, prompts, seed=5, steps=4, guidance=4.0)))
    assert all(np.array_equal(s.previews[i][1], base[i]) for i in range(2))  # "before" is the frozen model
    assert not np.array_equal(s.previews[-2][1], base[0])  # "after" shows the adapter's work
    assert hook_counts(world.unet) == 0


def test_no_decode_no_previews(world, tmp_path):
    be = world_backend(world)
    be.decode = None
    job = run(TrainJob(lambda: be, cfg(iterations=2), tmp_path / "n.safetensors",
                       preview=PreviewSettings(["a circle"], every=1, steps=2)))
    s = job.snapshot()
    assert s.state == "done" and s.previews == ()


class Failing:
    """The world's backend, failing on the n-th UNet prediction."""

    def __init__(self, world, n):
        self._be, self._n = world_backend(world), n
        self.unet, self.alphas_cumprod, self.latent_shape = self._be.unet, self._be.alphas_cumprod, self._be.latent_shape

    def encode(self, prompts):
        return self._be.encode(prompts)

    def predict_eps(self, x, t, cond):
        self._n -= 1
        if self._n == 0:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self._be.predict_eps(x, t, cond)


def test_a_failing_backend_fails_the_job_and_leaves_the_model_clean(world, tmp_path):
    grads = [p.requires_grad for p in world.unet.parameters()]
    hooks = hook_counts(world.unet)
    job = run(TrainJob(lambda: Failing(world, 6), cfg(), tmp_path / "f.safetensors"))
    s = job.snapshot()
    assert s.state == "failed" and s.finished
    assert s.error == "RuntimeError: CUDA out of memory (simulated)" and "out of memory" in s.message
    assert "Traceback" in job.traceback and s.output is None
    assert hook_counts(world.unet) == hooks  # train_spm detached its hooks on the way out
    assert [p.requires_grad for p in world.unet.parameters()] == grads
    assert not (tmp_path / "f.safetensors").exists()


def test_a_failing_factory_or_bad_resume_fails_with_the_message(world, tmp_path):
    def no_model():
        raise SPMRuntimeError("no model is loaded")

    s = run(TrainJob(no_model, cfg(), tmp_path / "x.safetensors")).snapshot()
    assert s.state == "failed" and s.error == "no model is loaded"
    part = run(TrainJob(lambda: world_backend(world), cfg(iterations=1), tmp_path / "r.safetensors",
                        checkpoint_every=1)).snapshot()
    assert part.checkpoint.exists()
    s = run(TrainJob(lambda: world_backend(world), cfg(rank=2), tmp_path / "y.safetensors",
                     resume_from=part.checkpoint)).snapshot()
    assert s.state == "failed" and "other settings: rank" in s.error


def test_the_hosts_interrupt_button_cancels(world, tmp_path):
    steps = []
    job = run(TrainJob(lambda: world_backend(world), cfg(iterations=6), tmp_path / "i.safetensors",
                       interrupted=lambda: len(steps) >= 3, progress=lambda d, t, text: steps.append(d)))
    s = job.snapshot()
    assert s.state == "cancelled" and s.step == 3 and s.message.startswith("interrupted at step 3/6")
    assert s.checkpoint.exists() and load_spm(s.output).metadata.recipe["steps_done"] == 3


def test_runner_refuses_a_second_job_while_one_runs(world, tmp_path):
    gate, entered = threading.Event(), threading.Event()

    @contextmanager
    def slot():  # the host's job slot, held by someone else until the gate opens
        entered.set()
        assert gate.wait(WAIT)
        yield

    runner = JobRunner()
    first = runner.start(TrainJob(lambda: world_backend(world), cfg(iterations=1), tmp_path / "1.safetensors", job=slot))
    assert entered.wait(WAIT) and runner.current() is first and first.running
    assert first.snapshot().message == "waiting for the job slot"
    with pytest.raises(SPMRuntimeError, match="already training .*no_circle"):
        runner.start(TrainJob(lambda: world_backend(world), cfg(), tmp_path / "2.safetensors"))
    assert runner.current() is first
    gate.set()
    assert first.wait(WAIT) and first.snapshot().state == "done"
    second = runner.start(TrainJob(lambda: world_backend(world), cfg(iterations=1), tmp_path / "2.safetensors"))
    assert second.wait(WAIT) and runner.current() is second and second.snapshot().state == "done"
    with pytest.raises(SPMRuntimeError, match="already started"):
        second.start()


def test_cancel_before_the_slot_frees_trains_nothing(world, tmp_path):
    gate = threading.Event()

    @contextmanager
    def slot():
        assert gate.wait(WAIT)
        yield

    built = []
    job = TrainJob(lambda: built.append(1) or world_backend(world), cfg(), tmp_path / "c.safetensors", job=slot).start()
    job.cancel()
    gate.set()
    assert job.wait(WAIT)
    s = job.snapshot()
    assert s.state == "cancelled" and s.step == 0 and built == [] and s.output is None
    assert not (tmp_path / "c.safetensors").exists()


def test_snapshot_is_a_copy(world, tmp_path):
    job = TrainJob(lambda: world_backend(world), cfg(iterations=2), tmp_path / "s.safetensors")
    idle = job.snapshot()
    assert idle.state == "idle" and idle.step == 0 and idle.total == 2 and not job.wait(0)
    run(job)
    assert idle.losses == () and len(job.snapshot().losses) == 2


def test_presets_are_complete_and_apply():
    for name, p in PRESETS.items():
        assert p.description and "\n" not in p.description and p.resolution % 8 == 0
        c = apply_preset(name, targets=["x"], seed=3)
        assert c.targets == ["x"] and c.seed == 3
    sdxl = apply_preset("civitai: SDXL")
    assert (sdxl.rank, sdxl.lr, sdxl.guidance, sdxl.la_strength, sdxl.anchors, sdxl.iterations) == (2, 2e-4, 2.0, 400.0, 1, 5000)
    assert sdxl.targets == ["bikini"] and sdxl.surrogates == {"bikini": "turtleneck"}
    orig = apply_preset("original: character", targets=["snoopy"])
    assert (orig.rank, orig.lr, orig.la_strength, orig.anchors, orig.max_denoising_steps) == (1, 1e-4, 1000.0, 4, 30)
    world_cfg = apply_preset("shapes world quick")
    world_cfg.templates.append("the {}")
    assert apply_preset("shapes world quick").templates == ["{}", "a {}"]  # the table is not shared
    with pytest.raises(SPMValueError, match="target"):
        apply_preset("original: style")
    with pytest.raises(SPMValueError, match="unknown preset"):
        apply_preset("nope", targets=["x"])
    with pytest.raises(SPMValueError, match="not training settings: resolution"):
        apply_preset("original: style", targets=["x"], resolution=512)
