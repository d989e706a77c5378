"""The Merge panel: SPMs and weights in; an exact pack, a compressed pack or a baked checkpoint out.

The work runs in a worker thread holding the host's job slot; the click handler is a generator
that relays the worker's progress, so the page never freezes. Every check (names, weights,
architectures, an existing output) happens before anything is written, and a refusal is shown
as one line of text.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import SPMError, SPMValueError
from ..operations.library import check_name, human_size
from ..values import name_weight, number, split_list, whole
from .host import UIHost

EXACT = "Exact (every SPM keeps its own gate)"
RANK = "Compressed to a rank"
BUDGET = "Compressed to an error budget"
BAKE = "Bake into a checkpoint"
METHODS = (EXACT, RANK, BUDGET, BAKE)
LOADED = "Loaded checkpoint"
_POLL_S = 0.5  # how often the handler reports while the worker runs


@dataclass
class MergePlan:
    """A checked request: every name exists, every weight is a number, the output is free."""

    inputs: list[tuple[str, float]]
    method: str
    rank: int | None
    budget: float | None
    out_name: str  # an SPM name (library) or a checkpoint file stem (bake)
    source: Path | None = None  # bake: the checkpoint read
    source_title: str | None = None
    out_path: Path | None = None  # bake: the checkpoint written


# -- choices -------------------------------------------------------------------------------------

def spm_choices(host: UIHost) -> list[str]:
    """Names of the usable SPMs in the folder (broken files cannot be merged)."""
    return [e.name for e in host.library.entries() if e.error is None]


def checkpoint_choices(host: UIHost) -> list[str]:
    """The loaded checkpoint first (when it is a file), then every checkpoint by title."""
    titles = list(host.checkpoints())
    return ([LOADED] if host.loaded_checkpoint() else []) + titles


def refreshed(host: UIHost, selected: list[str] | None) -> tuple[list[str], list[str]]:
    """(choices, the still-existing part of the selection) after the folder changed."""
    choices = spm_choices(host)
    return choices, [n for n in (selected or []) if n in choices]


def options_visible(method: str) -> tuple[bool, bool, bool]:
    """Which of rank, error budget and checkpoint the method uses."""
    return method == RANK, method == BUDGET, method == BAKE


# -- checking ------------------------------------------------------------------------------------

def parse_weights(text: str | None, names: list[str]) -> list[tuple[str, float]]:
    """Each selected name with its weight (1.0 unless given).

    ``text`` is either ``name: weight`` entries (lines or commas) or plain numbers in the order
    the SPMs were selected; the two can mix, numbers filling the names not given by name.
    """
    given: dict[str, float] = {}
    positional: list[float] = []
    for part in split_list(text or ""):
        name, w = name_weight(part)
        if w is None:
            positional.append(number(part, f"weight {part!r}", -math.inf, math.inf))
        elif name not in names:
            raise SPMValueError(f"weight given for {name!r}, which is not among the selected SPMs")
        elif name in given:
            raise SPMValueError(f"{name!r} has two weights")
        else:
            given[name] = w
    rest = [n for n in names if n not in given]
    if len(positional) > len(rest):
        raise SPMValueError(f"{len(positional)} plain weights for {len(rest)} SPMs without a named weight")
    given.update(zip(rest, positional))
    return [(n, given.get(n, 1.0)) for n in names]


def _default_name(names: list[str], method: str) -> str:
    stem = "+".join(n.rsplit("/", 1)[-1] for n in names[:3]) + ("+more" if len(names) > 3 else "")
    return stem + {EXACT: "_pack", RANK: "_compressed", BUDGET: "_compressed", BAKE: ""}[method]


def _checkpoint_name(name: str) -> str:
    name = check_name(name)  # same rules as SPM names: nothing leaves the folder
    if "/" in name:
        raise SPMValueError(f"checkpoint name {name!r} cannot hold a folder; it is written into the checkpoint folder")
    return name


def plan(host: UIHost, names: list[str] | None, weights: str | None, method: str, rank, budget,
         checkpoint: str | None, out_name: str | None) -> MergePlan:
    """Check a request against the folder and the host; :class:`SPMError` says what is wrong."""
    names = list(names or [])
    if not names:
        raise SPMValueError("select at least one SPM")
    if method not in METHODS:
        raise SPMValueError(f"unknown method {method!r}")
    if method == EXACT and len(names) < 2:
        raise SPMValueError("an exact merge needs at least two SPMs")
    missing = [n for n in names if not host.library.exists(n)]
    if missing:
        raise SPMValueError(f"no SPM named {missing[0]!r} in the folder (refresh the list)")
    inputs = parse_weights(weights, names)
    out_name = (out_name or "").strip()
    p = MergePlan(inputs, method, None, None, out_name)
    if method == RANK:
        p.rank = whole(rank, "the rank", 1)
    elif method == BUDGET:
        p.budget = number(budget, "the error budget", 0, 1)
        if p.budget == 1:
            raise SPMValueError("the error budget must be below 1: a relative error, for example 0.05")
    if method != BAKE:
        p.out_name = check_name(out_name) if out_name else host.library.unique_name(_default_name(names, method))
        if host.library.exists(p.out_name):
            raise SPMValueError(f"an SPM named {p.out_name!r} already exists; choose another name")
        return p
    checkpoints = host.checkpoints()
    title = host.loaded_checkpoint() if checkpoint in (None, "", LOADED) else checkpoint
    if title is None:
        raise SPMValueError("no checkpoint is loaded from a file; choose one to bake into")
    if title not in checkpoints:
        raise SPMValueError(f"no checkpoint {title!r} (refresh the list)")
    p.source, p.source_title = Path(checkpoints[title]), title
    if p.source.suffix != ".safetensors" or not p.source.is_file():
        raise SPMValueError(f"{p.source.name} is not a single-file .safetensors checkpoint; only those can be baked")
    folder = Path(host.checkpoint_dir())
    if out_name:
        p.out_name = _checkpoint_name(out_name)
    else:
        base, i = _checkpoint_name(f"{p.source.stem}_{_default_name(names, BAKE)}"), 0
        p.out_name = base
        while (folder / f"{p.out_name}.safetensors").exists():
            i += 1
            p.out_name = f"{base}-{i}"
    p.out_path = folder / f"{p.out_name}.safetensors"
    if p.out_path.exists():
        raise SPMValueError(f"{p.out_path.name} already exists in {folder}; baking never overwrites a file")
    if p.out_path.resolve() == p.source.resolve():
        raise SPMValueError("baking never overwrites the source checkpoint; choose another name")
    return p


# -- doing -----------------------------------------------------------------------------------------

def execute(host: UIHost, p: MergePlan, report: Callable[[str], None] = lambda text: None) -> str:
    """Do a checked plan (the caller holds the job slot); returns the result as text."""
    from ..operations.merge import bake_ldm_checkpoint, merge_compressed, merge_exact

    total = len(p.inputs) + 2

    def step(done: int, text: str) -> None:
        host.progress(done, total, text)
        report(text)

    spms = []
    for i, (name, w) in enumerate(p.inputs):
        step(i, f"loading {name}")
        spms.append((host.library.load(name), w))
    weights = ", ".join(f"{n} x{w:g}" for n, w in p.inputs)
    if p.method == BAKE:
        step(len(spms), f"baking into {p.source.name}")
        arch = None
        if all(s.arch is None for s, _ in spms) and p.source_title == host.loaded_checkpoint():
            arch = host.model_arch()
        p.out_path.parent.mkdir(parents=True, exist_ok=True)
        rep = bake_ldm_checkpoint(p.source, p.out_path, spms, arch=arch)
        step(total, "done")
        return (f"Baked {weights} into {p.out_path.name} ({human_size(p.out_path.stat().st_size)}), "
                f"{rep['layers']} layers changed, largest change {rep['max_abs_delta']:.3g}.\n"
                f"Source: {p.source_title}. The baked model applies the SPMs to every prompt at full "
                "strength: baking loses Facilitated Transport.")
    step(len(spms), "merging")
    if p.method == EXACT:
        pack, report_ = merge_exact(spms, name=p.out_name), None
    else:
        pack, report_ = merge_compressed(spms, rank=p.rank, error_budget=p.budget, name=p.out_name)
    step(len(spms) + 1, f"saving {p.out_name}")
    entry = host.library.save(pack, p.out_name)
    step(total, "done")
    lines = [f"Wrote {entry.name} ({human_size(entry.size_bytes)}): rank {pack.rank}, {len(pack.layers)} layers, "
             f"from {weights}."]
    if report_ is None:
        lines.append(f"Slices, each gated by its own concepts: {', '.join(s.name for s in pack.slices())}.")
    else:
        worst = max(report_.per_layer_error.values(), default=0.0)
        lines.append(f"Relative error {report_.overall_error:.4f} overall, {worst:.4f} on the worst layer. "
                     "One gate opens for any of its concepts.")
        if report_.note:
            lines.append(report_.note[0].upper() + report_.note[1:] + ".")
    return "\n".join(lines)


def run(host: UIHost, names, weights, method, rank, budget, checkpoint, out_name) -> Iterator[tuple[str, str | None]]:
    """The Merge button: yields (status text, new change token or None) until the work ends.

    A refusal is one yield with the message; the work itself runs in a worker thread under
    ``host.job`` and this generator relays its progress.
    """
    try:
        p = plan(host, names, weights, method, rank, budget, checkpoint, out_name)
    except SPMError as e:
        yield f"Error: {e}", None
        return
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            events.put(("status", "waiting for the running job to finish"))
            with host.job("SPM merge"):
                events.put(("done", execute(host, p, lambda text: events.put(("status", text)))))
        except (SPMError, OSError, ValueError) as e:
            events.put(("error", f"Error: {e}"))
        except BaseException as e:  # never leave the handler waiting
            events.put(("error", f"Error: {type(e).__name__}: {e}"))

    started = time.monotonic()
    threading.Thread(target=work, name="spm-merge", daemon=True).start()
    status = "starting"
    while True:
        try:
            kind, text = events.get(timeout=_POLL_S)
        except queue.Empty:
            yield f"{status} ... {time.monotonic() - started:.0f} s", None
            continue
        if kind == "status":
            status = text
            yield f"{status} ... {time.monotonic() - started:.0f} s", None
        elif kind == "error":
            yield text, None
            return
        else:
            yield text, str(time.time_ns())
            return


# -- gradio --------------------------------------------------------------------------------------

def build(host: UIHost, changed) -> None:
    """The panel's components and events, inside the caller's Blocks; ``changed`` is the hidden
    Textbox whose value changes whenever any panel changed the SPM folder."""
    import gradio as gr

    from . import gradio_compat

    with gr.Row():
        with gr.Column():
            inputs = gr.Dropdown(label="SPMs to merge", choices=spm_choices(host), value=[], multiselect=True,
                                 elem_id="spm_merge_inputs")
            weights = gr.Textbox(label="Weights", lines=2, elem_id="spm_merge_weights",
                                 placeholder="name: weight, per line or comma-separated; or 1.0, 0.5 in the "
                                             "order selected (default 1.0)")
            method = gr.Radio(list(METHODS), value=EXACT, label="Method", elem_id="spm_merge_method")
            rank = gr.Number(value=4, precision=0, label="Rank", visible=False, elem_id="spm_merge_rank")
            budget = gr.Number(value=0.05, label="Error budget (relative, per layer)", visible=False,
                               elem_id="spm_merge_budget")
            ckpts = checkpoint_choices(host)
            checkpoint = gr.Dropdown(label="Checkpoint to bake into", choices=ckpts, value=ckpts[0] if ckpts else None,
                                     visible=False, elem_id="spm_merge_checkpoint")
            name = gr.Textbox(label="Output name", placeholder="empty: named after the inputs",
                              elem_id="spm_merge_name")
            go = gr.Button("Merge", variant="primary", elem_id="spm_merge_run")
        with gr.Column():
            result = gr.Textbox(label="Result", lines=6, interactive=False, elem_id="spm_merge_result")

    def on_method(m):
        r, b, c = options_visible(m)
        return gradio_compat.update(visible=r), gradio_compat.update(visible=b), gradio_compat.update(visible=c)

    def on_changed(selected, chosen):
        choices, kept = refreshed(host, selected)
        ckpts = checkpoint_choices(host)
        return (gradio_compat.update(choices=choices, value=kept),
                gradio_compat.update(choices=ckpts, value=chosen if chosen in ckpts else (ckpts[0] if ckpts else None)))

    def on_run(*args):
        for text, token in run(host, *args):
            yield text, (token if token is not None else gradio_compat.update())

    method.change(on_method, inputs=[method], outputs=[rank, budget, checkpoint])
    changed.change(on_changed, inputs=[inputs, checkpoint], outputs=[inputs, checkpoint])
    go.click(on_run, inputs=[inputs, weights, method, rank, budget, checkpoint, name], outputs=[result, changed])
