"""The Train panel of the SPM tab: a recipe, a concept, a background job, live loss and previews.

Training runs as a :class:`~lib_spm.training.jobs.TrainJob` in its own thread under the host's job slot;
the page only watches it. ``Train`` is a generator handler that yields the job's state about
every ``poll`` seconds until it ends, so closing the page stops nothing: "Show running job"
re-attaches. One job runs at a time, through the host's ``jobs`` runner when it has one (so a
rebuilt UI still finds the job), else through one runner per built panel.

Handlers are plain methods tested without gradio; ``build`` lays the components out and wires them.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import SPMError, SPMValueError
from ..training.cost import adapter_passes_per_iteration, sample_passes_per_iteration
from ..training.jobs import JobRunner, JobSnapshot, PreviewSettings, TrainJob
from ..training.train_config import (
    SAMPLINGS,
    TrainConfig,
    read_checkpoint,
    resume_differences,
)
from ..values import number, whole
from ..world.presets import PRESETS, apply_preset

if TYPE_CHECKING:
    from .host import UIHost

NO_RESUME = "(none: start fresh)"
CHECKPOINT_SUFFIX = ".ckpt.safetensors"
MAX_PLOT_POINTS = 500
PREVIEW_STEPS, PREVIEW_GUIDANCE = 20, 7.5

# Per-architecture defaults: the resolution each family was trained at (SD2's 768 px v-models
# also train well at 512), and the preset the panel opens with.
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}
DEFAULT_PRESET = {"sd1": "original: character", "sd2": "original: character", "sdxl": "civitai: SDXL",
                  None: "shapes world quick"}

# Rough seconds per UNet sample-pass (one latent, forward) for the duration estimate; cost grows
# with the pixel count. CPU: measured, full-size SD1.5 at 512 px, 7.09 s per batch-2 call on the
# 2-core dev box (BENCHMARKS.md, runtime). CUDA/MPS: a rough figure for a current GPU in fp16,
# NOT measured here (no GPU machine yet). SDXL costs about 1.25x SD1 per pixel. The shapes world
# (no arch): measured, 0.565 s per iteration of its quick recipe (BENCHMARKS.md, training cost).
SECONDS_PER_PASS_512 = {"cpu": 3.5, "cuda": 0.03, "mps": 0.15}
ARCH_COST = {"sd1": 1.0, "sd2": 1.0, "sdxl": 1.25}
WORLD_SECONDS_PER_ITERATION = 0.565
BACKWARD_PASSES = 3  # pass-equivalents of the backward through the adapter's forward pass

# What the Sampling choice trades (BENCHMARKS.md, "pool"): shown under it.
SAMPLING_INFO = ("fresh: new noise denoised every step (the published method). pool: trajectories shared "
                 "between steps, about 3x fewer UNet passes, but it leans on the gate: with the gate off "
                 "(or the SPM baked into a checkpoint) it erased 0.54 against fresh's 0.93.")

# The recipe fields the panel shows, in the order of on_preset's and on_resume's outputs.
SHOWN = ("targets", "surrogates", "guidance", "iterations", "lr", "rank", "la_strength", "anchors", "sampling")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _error(text: str) -> str:
    return f'<span class="spm-error" style="color: var(--error-text-color, #d00)">{esc(text)}</span>'


# -- parsing ---------------------------------------------------------------------------------------

def split_concepts(text: str | None) -> list[str]:
    """One concept per line when the text has line breaks (concepts may then hold commas), else comma-separated."""
    text = (text or "").strip()
    parts = text.splitlines() if "\n" in text else text.split(",")
    return [p.strip() for p in parts if p.strip()]


def concepts_text(concepts: list[str]) -> str:
    """What :func:`split_concepts` reads back: one per line when a concept holds a comma."""
    return "\n".join(concepts) if any("," in c for c in concepts) else ", ".join(concepts)


def parse_surrogates(text: str | None, targets: list[str]) -> dict[str, str]:
    """One surrogate for every target, or one per target in order (an empty entry: erase towards "")."""
    text = (text or "").strip()
    if not text:
        return {}
    parts = [p.strip() for p in (text.splitlines() if "\n" in text else text.split(","))]
    if len(parts) == 1:
        return {t: parts[0] for t in targets}
    if len(parts) != len(targets):
        raise SPMValueError(f"give one surrogate for all targets, or one per target: {len(targets)} targets, "
                            f"{len(parts)} surrogates")
    return {t: s for t, s in zip(targets, parts) if s}


def surrogates_text(targets: list[str], surrogates: dict[str, str]) -> str:
    values = [surrogates.get(t, "") for t in targets]
    if values and all(v == values[0] for v in values):
        return values[0]
    return ", ".join(values)


@dataclass
class TrainRequest:
    """Inputs checked and turned into what a :class:`TrainJob` takes."""

    cfg: TrainConfig
    resolution: int
    output: Path
    checkpoint_every: int
    resume_from: Path | None
    preview: PreviewSettings | None


# -- the panel -------------------------------------------------------------------------------------

def pandas_frame(steps: list[int], losses: list[float]):
    """The LinePlot's value: a DataFrame with columns step, loss (pandas comes with gradio)."""
    import pandas as pd

    return pd.DataFrame({"step": steps, "loss": losses})


def loss_points(last_step: int, losses: tuple[float, ...] | list[float],
                max_points: int = MAX_PLOT_POINTS) -> tuple[list[int], list[float]]:
    """(steps, losses) for the plot: the run's losses end at ``last_step``; more than
    ``max_points`` are averaged in buckets (each at its bucket's last step)."""
    n = len(losses)
    first = last_step - n + 1
    if n <= max_points:
        return list(range(first, last_step + 1)), [float(v) for v in losses]
    size = -(-n // max_points)
    steps, values = [], []
    for a in range(0, n, size):
        chunk = losses[a : a + size]
        steps.append(first + a + len(chunk) - 1)
        values.append(float(sum(chunk) / len(chunk)))
    return steps, values


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def passes_per_iteration(cfg_fields: dict) -> float:
    """Expected UNet sample-pass equivalents of one iteration of a run with these TrainConfig
    fields: the passes the trainer counts (:func:`~lib_spm.training.cost.sample_passes_per_iteration`,
    fresh or pool sampling) plus the backward of the adapter's pass, about two more (three with
    gradient checkpointing; counted, to be safe)."""
    cfg = TrainConfig(**{"targets": ["x"], **cfg_fields})
    return sample_passes_per_iteration(cfg) + BACKWARD_PASSES * adapter_passes_per_iteration(cfg)


def seconds_per_pass(arch: str | None, device: str, resolution: int) -> float:
    if arch is None:
        return WORLD_SECONDS_PER_ITERATION / passes_per_iteration(PRESETS["shapes world quick"].config)
    per = SECONDS_PER_PASS_512.get(device, SECONDS_PER_PASS_512["cuda"])
    return per * ARCH_COST.get(arch, 1.0) * (resolution / 512) ** 2


def estimate_text(preset: str | None, iterations, anchors, resolution, arch: str | None, device: str,
                  sampling: str = "fresh", targets: str = "", surrogates: str = "") -> str:
    """One line: the run's rough duration before it starts (the running job's ETA is measured).
    Targets and surrogates matter to "pool" sampling only (a named surrogate costs a pass)."""
    try:
        its, k = whole(iterations, "Iterations", 1), whole(anchors, "Anchor count", 0)
        res = whole(resolution, "Resolution", 8)
        concepts = split_concepts(targets) or ["x"]
        named = parse_surrogates(surrogates, concepts) if split_concepts(targets) else {}
        fields = {**(PRESETS[preset].config if preset in PRESETS else {}), "anchors": k, "iterations": its,
                  "sampling": sampling, "targets": concepts, "surrogates": named}
        passes = passes_per_iteration(fields)
    except SPMValueError:
        return ""
    per = seconds_per_pass(arch, device, res)
    model = "the shapes world" if arch is None else f"{arch.upper()} at {res} px on {device.upper()}"
    source = "measured" if arch is None or device == "cpu" else "rough, not measured"
    return (f"Estimated duration: about {_clock(its * passes * per)} ({its} iterations × ~{passes:.0f} "
            f"UNet passes ({sampling} sampling) × {per:.3g} s per pass for {model}, {source}); the ETA while "
            f"it runs is measured.")


def status_html(s: JobSnapshot) -> str:
    parts = [f"<b>{esc(s.state)}</b>", f"step {s.step}/{s.total}"]
    if s.losses:
        parts.append(f"loss {s.losses[-1]:.4g}")
    if s.state == "running" and s.losses:
        parts.append(f"ETA {_clock(s.eta)}")
    line = " · ".join(parts)
    msg = _error(s.message) if s.state == "failed" else esc(s.message)
    out = f"<div class='spm-train-status'>{line}<br>{msg}"
    if s.output is not None:
        out += f"<br>SPM: <code>{esc(s.output.name)}</code>"
    if s.checkpoint is not None:
        out += f" · checkpoint: <code>{esc(s.checkpoint.name)}</code>"
    return out + "</div>"


class TrainPanel:
    """The panel's handlers over one host and one job runner."""

    def __init__(self, host: UIHost, runner: JobRunner | None = None, *, poll: float = 0.75,
                 frame: Callable[[list[int], list[float]], object] = pandas_frame):
        self.host = host
        self.runner = runner if runner is not None else JobRunner()
        self.poll, self.frame = poll, frame

    # -- lists and fills ---------------------------------------------------------------------------
    def resume_choices(self) -> list[str]:
        """``NO_RESUME``, then every training checkpoint below the SPM folder (relative paths)."""
        root = Path(self.host.library.root)
        if not root.is_dir():
            return [NO_RESUME]
        real = root.resolve()
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*" + CHECKPOINT_SUFFIX)
                       if p.is_file() and p.resolve().is_relative_to(real))
        return [NO_RESUME] + found

    def checkpoint_of(self, choice: str | None) -> Path | None:
        if not choice or choice == NO_RESUME:
            return None
        if choice not in self.resume_choices():
            raise SPMValueError(f"no training checkpoint {choice!r} in the SPM folder (refresh the list)")
        return Path(self.host.library.root) / choice

    def on_preset(self, name: str | None, targets: str, surrogates: str) -> tuple:
        """(description, targets, surrogates, guidance, iterations, lr, rank, la_strength, anchors,
        sampling, resolution): a preset's recipe; its example concept only fills an empty targets box."""
        p = PRESETS.get(name or "")
        if p is None:
            return ("", targets, surrogates) + (None,) * (len(SHOWN) - 1)
        c = p.config
        if not split_concepts(targets) and p.targets:
            targets, surrogates = concepts_text(list(p.targets)), surrogates_text(list(p.targets), p.surrogates)
        defaults = TrainConfig(targets=["x"])
        recipe = [c.get(k, getattr(defaults, k)) for k in SHOWN[2:]]
        return (p.description, targets, surrogates, *recipe, self.default_resolution(p.resolution))

    def default_resolution(self, preset_resolution: int) -> int:
        """The loaded model's native resolution (512 for SD1/SD2, 1024 for SDXL); the preset's
        where the model is none of them (the shapes world)."""
        return DEFAULT_RESOLUTION.get(self.host.model_arch(), preset_resolution)

    def default_preset(self) -> str:
        return DEFAULT_PRESET.get(self.host.model_arch(), next(iter(PRESETS)))

    def on_estimate(self, preset, iterations, anchors, resolution, sampling="fresh", targets="",
                    surrogates="") -> str:
        device = getattr(self.host, "device_type", lambda: "cpu")()
        return estimate_text(preset, iterations, anchors, resolution, self.host.model_arch(), device, sampling,
                             targets, surrogates)

    def on_resume(self, choice: str | None, *shown) -> tuple | None:
        """The checkpoint's settings for the shown fields (``SHOWN``, then seed and name) and a
        status line; None (nothing to change) when starting fresh."""
        try:
            path = self.checkpoint_of(choice)
            if path is None:
                return None
            saved, step = read_checkpoint(path)
        except (SPMError, OSError) as e:
            return (*shown, _error(f"cannot resume: {e}"))
        values = [concepts_text(saved.targets), surrogates_text(saved.targets, saved.surrogates), saved.guidance,
                  saved.iterations, saved.lr, saved.rank, saved.la_strength, saved.anchors, saved.sampling, saved.seed,
                  choice[: -len(CHECKPOINT_SUFFIX)]]
        note = (f"Resuming {esc(choice)} at step {step}: its settings are filled in; raise Iterations to "
                f"train longer (every other setting must stay as it was).")
        return (*values, note)

    # -- checking inputs ---------------------------------------------------------------------------
    def request(self, preset, targets, surrogates, guidance, iterations, lr, rank, la_strength, anchors, sampling,
                resolution, seed, name, checkpoint_every, preview_every, preview_prompt, resume) -> TrainRequest:
        """Everything the inputs say, checked; :class:`SPMValueError` with a clear message otherwise.

        The boxes' text becomes numbers here; their ranges are :class:`TrainConfig`'s to check."""
        concepts = split_concepts(targets)
        if not concepts:
            raise SPMValueError("give at least one target concept to erase")
        anything = (-math.inf, math.inf)
        fields = dict(
            targets=concepts, surrogates=parse_surrogates(surrogates, concepts),
            guidance=number(guidance, "Erase guidance", *anything),
            iterations=whole(iterations, "Iterations"), lr=number(lr, "Learning rate", *anything),
            rank=whole(rank, "Rank"), la_strength=number(la_strength, "Latent Anchoring strength", *anything),
            anchors=whole(anchors, "Anchor count"), seed=whole(seed, "Seed"), sampling=sampling,
        )
        res = whole(resolution, "Resolution", 8)  # the host checks its own range
        if res % 8 or res > 4096:
            raise SPMValueError(f"Resolution must be a multiple of 8 up to 4096, not {res}")
        every = whole(checkpoint_every, "Checkpoint every", 0)
        p_every = whole(preview_every, "Preview every", 0)
        name = (name or "").strip()
        if not name:
            raise SPMValueError("give the SPM a name (its file name in the SPM folder)")
        output = self.host.library.path_of(name)
        arch = self.host.model_arch()
        ckpt = self.checkpoint_of(resume)
        if ckpt is not None:
            saved, step = read_checkpoint(ckpt)
            if saved.arch != arch:
                raise SPMValueError(f"the checkpoint was trained on {saved.arch or 'another model'}; "
                                    f"the loaded model is {arch or 'another model'}")
            cfg = TrainConfig(**{**asdict(saved), **fields})
            diff = resume_differences(cfg, saved)
            if diff:
                raise SPMValueError(f"a resumed run keeps the checkpoint's settings; these differ: {', '.join(diff)}")
            if cfg.iterations <= step:
                raise SPMValueError(f"the checkpoint is at step {step}: set Iterations above {step} to train on")
        else:
            if output.exists():
                raise SPMValueError(f"an SPM named {name!r} exists; choose another name (or delete it in Manage)")
            if preset in PRESETS:
                cfg = apply_preset(preset, **fields, name=name, arch=arch)
            else:
                cfg = TrainConfig(**fields, name=name, arch=arch)
        prompts = [q.strip() for q in (preview_prompt or "").splitlines() if q.strip()] or concepts[:1]
        preview = PreviewSettings(prompts, every=p_every, seed=cfg.seed, steps=PREVIEW_STEPS,
                                  guidance=PREVIEW_GUIDANCE) if p_every else None
        return TrainRequest(cfg, res, output, every, ckpt, preview)

    def job_for(self, req: TrainRequest) -> TrainJob:
        host, res = self.host, req.resolution
        return TrainJob(lambda: host.backend(res), req.cfg, req.output, checkpoint_every=req.checkpoint_every,
                        resume_from=req.resume_from, preview=req.preview,
                        job=lambda: host.job(f"Train SPM {req.cfg.name}"), interrupted=host.interrupted,
                        progress=host.progress)

    # -- the event handlers ------------------------------------------------------------------------
    def start(self, preset, targets, surrogates, guidance, iterations, lr, rank, la_strength, anchors, sampling,
              resolution, seed, name, checkpoint_every, preview_every, preview_prompt, resume,
              changed) -> Iterator[tuple]:
        """Yields (status HTML, loss plot, previews, changed token) until the job ends."""
        try:
            req = self.request(preset, targets, surrogates, guidance, iterations, lr, rank, la_strength, anchors,
                               sampling, resolution, seed, name, checkpoint_every, preview_every, preview_prompt,
                               resume)
            job = self.runner.start(self.job_for(req))
        except (SPMError, OSError) as e:
            yield _error(f"Not started: {e}"), None, [], changed
            return
        yield from self.follow(job, changed)

    def watch(self, changed) -> Iterator[tuple]:
        """Re-attach to the current job (after a page reload)."""
        job = self.runner.current()
        if job is None:
            yield "No training job has run since the UI started.", None, [], changed
            return
        yield from self.follow(job, changed)

    def cancel(self) -> str:
        job = self.runner.current()
        if job is None or not job.running:
            return "No training job is running."
        job.cancel()
        return "Cancelling after the current step: the SPM so far and its checkpoint will be saved."

    def follow(self, job: TrainJob, changed) -> Iterator[tuple]:
        while True:
            s = job.snapshot()
            if s.finished:
                yield self.view(s, str(time.time_ns()))  # a new token: the other panels list the new files
                return
            yield self.view(s, changed)
            job.wait(self.poll)

    def view(self, s: JobSnapshot, changed) -> tuple:
        plot = self.frame(*loss_points(s.step, s.losses)) if s.losses else None
        return status_html(s), plot, [(im, caption) for caption, im in s.previews], changed


# -- layout ------------------------------------------------------------------------------------------

def build(host: UIHost, changed) -> dict:
    """Lay the panel out inside the caller's open Blocks/Tab; ``changed`` is the tab's hidden
    Textbox, set to a new token whenever a run ends (files were written)."""
    import gradio as gr

    from .gradio_compat import update

    panel = TrainPanel(host, getattr(host, "jobs", None))
    first = panel.default_preset()
    desc, t0, s0, g0, it0, lr0, r0, la0, an0, sa0, res0 = panel.on_preset(first, "", "")

    def fill_from_checkpoint(choice, *shown_values):
        values = panel.on_resume(choice, *shown_values)
        return values if values is not None else tuple(update() for _ in range(len(shown_values) + 1))

    def refresh(current):
        choices = panel.resume_choices()
        return update(choices=choices, value=current if current in choices else NO_RESUME)

    preset = gr.Dropdown(label="Preset", choices=list(PRESETS), value=first, elem_id="spm_train_preset")
    preset_info = gr.Markdown(desc, elem_id="spm_train_preset_info")
    with gr.Row():
        targets = gr.Textbox(label="Target concepts (comma-separated, or one per line)", value=t0, lines=1,
                             elem_id="spm_train_targets")
        surrogates = gr.Textbox(label="Surrogates (one for all, or one per target; empty: erase towards \"\")",
                                value=s0, lines=1, elem_id="spm_train_surrogates")
    with gr.Row():
        guidance = gr.Number(label="Erase guidance", value=g0, elem_id="spm_train_guidance")
        iterations = gr.Number(label="Iterations", value=it0, precision=0, elem_id="spm_train_iterations")
        lr = gr.Number(label="Learning rate", value=lr0, elem_id="spm_train_lr")
        rank = gr.Number(label="Rank", value=r0, precision=0, elem_id="spm_train_rank")
    with gr.Row():
        la_strength = gr.Number(label="Latent Anchoring strength", value=la0, elem_id="spm_train_la_strength")
        anchors = gr.Number(label="Anchors per step", value=an0, precision=0, elem_id="spm_train_anchors")
        resolution = gr.Number(label="Resolution", value=res0, precision=0, elem_id="spm_train_resolution")
        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="spm_train_seed")
    sampling = gr.Radio(label="Sampling", choices=list(SAMPLINGS), value=sa0, info=SAMPLING_INFO,
                        elem_id="spm_train_sampling")
    with gr.Row():
        name = gr.Textbox(label="Output name (folders with /)", elem_id="spm_train_name")
        checkpoint_every = gr.Number(label="Checkpoint every N steps (0: only on cancel)", value=500, precision=0,
                                     elem_id="spm_train_checkpoint_every")
    with gr.Row():
        preview_every = gr.Number(label="Preview every N steps (0: off)", value=250, precision=0,
                                  elem_id="spm_train_preview_every")
        preview_prompt = gr.Textbox(label="Preview prompts (one per line; empty: the first target)", lines=1,
                                    elem_id="spm_train_preview_prompt")
    with gr.Row():
        resume = gr.Dropdown(label="Resume from checkpoint", choices=panel.resume_choices(), value=NO_RESUME,
                             elem_id="spm_train_resume")
        refresh_button = gr.Button("Refresh", elem_id="spm_train_resume_refresh")
    with gr.Row():
        start = gr.Button("Train", variant="primary", elem_id="spm_train_start")
        cancel = gr.Button("Cancel and save", variant="stop", elem_id="spm_train_cancel")
        watch = gr.Button("Show running job", elem_id="spm_train_watch")
    estimate = gr.Markdown(panel.on_estimate(first, it0, an0, res0, sa0, t0, s0), elem_id="spm_train_estimate")
    status = gr.HTML(elem_id="spm_train_status")
    loss = gr.LinePlot(x="step", y="loss", title="Loss", elem_id="spm_train_loss")
    previews = gr.Gallery(label="Previews: before, then after every N steps", columns=4,
                          elem_id="spm_train_previews")

    shown = [targets, surrogates, guidance, iterations, lr, rank, la_strength, anchors, sampling]
    inputs = [preset, *shown, resolution, seed, name, checkpoint_every, preview_every, preview_prompt, resume, changed]
    outputs = [status, loss, previews, changed]
    preset.change(panel.on_preset, inputs=[preset, targets, surrogates],
                  outputs=[preset_info, *shown, resolution])
    for box in (preset, iterations, anchors, resolution, sampling, targets, surrogates):
        box.change(panel.on_estimate, inputs=[preset, iterations, anchors, resolution, sampling, targets, surrogates],
                   outputs=[estimate])
    resume.change(fill_from_checkpoint, inputs=[resume, *shown, seed, name], outputs=[*shown, seed, name, status])
    for event in (refresh_button.click, changed.change):
        event(refresh, inputs=[resume], outputs=[resume])
    start.click(panel.start, inputs=inputs, outputs=outputs, show_progress="hidden")
    watch.click(panel.watch, inputs=[changed], outputs=outputs, show_progress="hidden")
    cancel.click(panel.cancel, outputs=[status])
    return {"panel": panel, "preset": preset, "targets": targets, "surrogates": surrogates, "guidance": guidance,
            "iterations": iterations, "lr": lr, "rank": rank, "la_strength": la_strength, "anchors": anchors,
            "sampling": sampling, "resolution": resolution, "seed": seed, "name": name,
            "checkpoint_every": checkpoint_every, "preview_every": preview_every, "preview_prompt": preview_prompt, "resume": resume,
            "start": start, "cancel": cancel, "watch": watch, "estimate": estimate, "status": status, "loss": loss, "previews": previews}
