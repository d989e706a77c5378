"""Training as a background job: one thread per run, snapshots for any UI, one job at a time.

Host-agnostic: the host lends its job slot (a context manager), its Interrupt button and its
progress bar as plain callables. The backend is built inside the thread, under the job slot, so
a host never loads or touches its model for training while it generates.

Previews sample the preview prompts with a plain DDIM/CFG loop over the backend's own
``predict_eps`` (adapter off for "before", on for "after") from their own seeded generator, so
they never change what is trained: a run with previews writes the same bytes as one without.
"""

from __future__ import annotations

import threading
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from ..errors import SPMError, SPMRuntimeError
from .schedule import ddim_step, leading_timesteps
from .train_config import TrainConfig, checkpoint_path
from .trainer import Backend, Conditioning, Trainer, TrainStatus, train_spm

IDLE, RUNNING, DONE, CANCELLED, FAILED = "idle", "running", "done", "cancelled", "failed"
FINISHED = (DONE, CANCELLED, FAILED)


@dataclass
class PreviewSettings:
    """Before/after images of ``prompts``: at the start, every ``every`` steps and at the end
    (``every`` 0: no previews)."""

    prompts: list[str]
    every: int = 0
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    keep: int = 6  # "after" sets kept (the newest); the "before" set is always kept


@dataclass(frozen=True)
class JobSnapshot:
    state: str  # idle / running / done / cancelled / failed
    step: int
    total: int
    losses: tuple[float, ...]  # one per step trained in this run
    eta: float | None  # seconds
    message: str
    previews: tuple[tuple[str, np.ndarray], ...]  # (caption, H x W x 3 uint8)
    output: Path | None  # the SPM file, once written
    checkpoint: Path | None  # the training checkpoint, once written
    error: str | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class TrainJob:
    """``train_spm`` in a daemon thread.

    ``backend_factory`` is called inside the thread, under ``job()`` (the host's job slot);
    ``interrupted()`` (the host's Interrupt button) cancels like :meth:`cancel`; ``progress(done,
    total, text)`` mirrors each step into the host's progress bar. Cancelling saves the SPM
    trained so far and its checkpoint, which :func:`train_spm` can resume from.
    """

    def __init__(self, backend_factory: Callable[[], Backend], cfg: TrainConfig, output: str | Path, *,
                 checkpoint_every: int = 0, resume_from: str | Path | None = None,
                 preview: PreviewSettings | None = None, job: Callable[[], ContextManager] = nullcontext,
                 interrupted: Callable[[], bool] | None = None,
                 progress: Callable[[int, int, str], None] | None = None):
        self.cfg, self.output = cfg, Path(output)
        self.checkpoint_every, self.resume_from = checkpoint_every, resume_from
        self.preview = preview if preview is not None and preview.prompts and preview.every > 0 else None
        self._factory, self._job, self._interrupted, self._progress = backend_factory, job, interrupted, progress
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._snap = JobSnapshot(IDLE, 0, cfg.iterations, (), None, "not started", (), None, None, None)
        self._losses: list[float] = []
        self._before: list[tuple[str, np.ndarray]] = []
        self._after: list[list[tuple[str, np.ndarray]]] = []
        self._previewed_at = -1
        self._by_host = False
        self.traceback: str | None = None  # of a failure, for the host's log
        self._notice = ""  # shown with every step's message

    # -- control ---------------------------------------------------------------------------------
    def start(self) -> "TrainJob":
        with self._lock:
            if self._thread is not None:
                raise SPMRuntimeError("this training job was already started")
            self._snap = replace(self._snap, state=RUNNING, message="waiting for the job slot")
            self._thread = threading.Thread(target=self._run, name=f"spm-train-{self.cfg.name}", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop after the current step; the SPM so far and its checkpoint are saved."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (or ``timeout`` seconds pass); True once it has ended."""
        if self._thread is None:
            return False
        return self._finished.wait(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._finished.is_set()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return replace(self._snap, losses=tuple(self._losses),
                           previews=tuple(self._before) + tuple(p for s in self._after for p in s))

    # -- the thread ------------------------------------------------------------------------------
    def _update(self, **kw) -> None:
        with self._lock:
            self._snap = replace(self._snap, **kw)

    def _should_stop(self) -> bool:
        if self._cancel.is_set():
            return True
        if self._interrupted is not None and self._interrupted():
            self._by_host = True
            return True
        return False

    def _run(self) -> None:
        try:
            with self._job():
                if self._should_stop():
                    self._update(state=CANCELLED, message="cancelled before it started")
                    return
                self._update(message="preparing the model")
                backend = self._factory()
                self._update(message="training")
                res = train_spm(backend, self.cfg, self.output, on_step=self._on_step,
                                should_stop=self._should_stop, checkpoint_every=self.checkpoint_every,
                                resume_from=self.resume_from, watch=self._watch)
            if res.cancelled:
                who = "interrupted" if self._by_host else "cancelled"
                msg = (f"{who} at step {res.steps}/{self.cfg.iterations}: saved {res.spm_path.name} and "
                       f"{res.checkpoint_path.name} (resume from it)")
            else:
                msg = f"done: {res.steps} steps in {res.seconds:.0f} s, saved {res.spm_path.name}"
            self._update(state=CANCELLED if res.cancelled else DONE, step=res.steps, eta=0.0, message=msg,
                         output=res.spm_path, checkpoint=res.checkpoint_path)
        except BaseException as e:  # the thread's end: every failure becomes the job's state
            text = str(e) if isinstance(e, SPMError) else f"{type(e).__name__}: {e}"
            self.traceback = traceback.format_exc()
            self._update(state=FAILED, message=f"failed: {text}", error=text, eta=None)
        finally:
            self._finished.set()

    def _on_step(self, st: TrainStatus) -> None:
        text = f"step {st.step}/{st.total}, loss {st.loss:.4g}" + (f" ({self._notice})" if self._notice else "")
        with self._lock:
            self._losses.append(st.loss)
            self._snap = replace(self._snap, step=st.step, total=st.total, eta=st.eta_seconds, message=text)
        if self._progress is not None:
            self._progress(st.step, st.total, text)

    def _watch(self, trainer: Trainer) -> None:
        step = trainer.step  # a resumed run starts at its checkpoint's step
        if self.checkpoint_every and step and step % self.checkpoint_every == 0:
            self._update(step=step, checkpoint=checkpoint_path(self.output))
        else:
            self._update(step=step)
        p = self.preview
        if p is None or step == self._previewed_at:
            return
        if not callable(getattr(trainer.backend, "decode", None)):
            self.preview = None  # the host cannot turn latents into images
            return
        first = self._previewed_at < 0
        if not (first or step % p.every == 0 or step == self.cfg.iterations):
            return
        self._previewed_at = step
        try:
            if first:
                with trainer.adapter.disabled():
                    imgs = self._sample(trainer.backend, p)
                with self._lock:
                    self._before = [(f"{q or '(empty)'}: before", im) for q, im in zip(p.prompts, imgs)]
            if step > 0:  # at step 0 the adapter is the identity: "after" would repeat "before"
                imgs = self._sample(trainer.backend, p)
                with self._lock:
                    self._after = (self._after + [[(f"{q or '(empty)'}: step {step}", im)
                                                   for q, im in zip(p.prompts, imgs)]])[-p.keep:]
        except Exception as e:  # a preview must never cost the training run
            self.preview = None
            self._notice = f"previews stopped: {type(e).__name__}: {e}"

    @staticmethod
    def _sample(backend, p: PreviewSettings) -> list[np.ndarray]:
        with torch.no_grad():
            images = backend.decode(sample_latents(backend, p.prompts, seed=p.seed, steps=p.steps,
                                                   guidance=p.guidance))
        return to_uint8(images)


class JobRunner:
    """The one owner of "the current job": a second job is refused while one runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._current: TrainJob | None = None

    def start(self, job: TrainJob) -> TrainJob:
        with self._lock:
            cur = self._current
            if cur is not None and cur.running:
                s = cur.snapshot()
                raise SPMRuntimeError(f"an SPM is already training ({cur.cfg.name}, step {s.step}/{s.total}); "
                                      "cancel it or wait for it to finish")
            job.start()
            self._current = job
        return job

    def current(self) -> TrainJob | None:
        return self._current


# -- previews ------------------------------------------------------------------------------------

def sample_latents(backend: Backend, prompts: Sequence[str], *, seed: int = 0, steps: int = 20,
                   guidance: float = 7.5) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance over ``backend.predict_eps``; image i's noise
    depends only on (seed, i). Draws from its own generator, never the global or a trainer's."""
    device = next(backend.unet.parameters()).device
    acp = backend.alphas_cumprod.float().to(device)
    T, n = acp.shape[0], len(prompts)
    steps = max(1, min(int(steps), T))
    ts = leading_timesteps(steps, T)
    cond = backend.encode(list(prompts))
    both = Conditioning.cat([backend.encode([""]).repeat(n), cond])
    x = torch.stack([torch.randn(backend.latent_shape, generator=torch.Generator().manual_seed(seed * 100_003 + i))
                     for i in range(n)]).to(device)
    for i, t in enumerate(ts):
        eps_u, eps_c = backend.predict_eps(torch.cat([x, x]), t.repeat(2 * n).to(device), both).float().chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        ap = acp[ts[i + 1]] if i + 1 < len(ts) else acp[0]  # DDIM's final alpha without set_alpha_to_one
        x = ddim_step(x, eps, acp[t], ap)
    return x


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] in [0, 1] -> B read-only H x W x 3 uint8 arrays."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for im in arr:
        im = np.ascontiguousarray(im)
        im.flags.writeable = False
        out.append(im)
    return out
