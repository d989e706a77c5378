"""The Test panel: type prompts, pick SPMs, see each SPM's gate per prompt, ``AND`` part and chunk.

Operators check a pack here before enforcing it: the enforced SPMs are always shown too, with the
gate the operator's settings give them. Gates come from :mod:`lib_spm.runtime.gate_report` (the runtime's
own scoring) under the host's hold on the model; before/after images only where the host can
generate them cleanly. ``/spm/v1/gates`` answers the same request as JSON (:func:`api`).
Nothing here writes a file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from ..errors import SPMError, SPMValueError
from ..operations.library import check_name
from ..runtime import functional
from ..runtime.gate_report import GateReport, Probe, check_prompts, report
from ..runtime.gating import GateSettings
from ..values import flag, number
from .host import UIHost

MAX_FACTOR = 10.0
IMAGE_PROMPTS = 8  # before/after images for the first prompts only: each costs a generation
API_KEYS = ("prompts", "spms", "ft", "factor", "metric")
NO_IMAGES = "Gates only: this host cannot make before/after images here."


@dataclass(frozen=True)
class TestRequest:
    prompts: list[str]
    names: list[str]  # the user's SPMs, checked names
    gate: GateSettings  # theirs; enforced SPMs keep the operator's


# -- checking what was asked -------------------------------------------------------------------

def split_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines dropped (an ``AND`` stays inside its line)."""
    if not isinstance(text, str):
        raise SPMValueError("prompts must be text, one per line")
    return [line.strip() for line in text.splitlines() if line.strip()]


def make_request(prompts, names, ft, factor, metric) -> TestRequest:
    if names is None:
        names = []
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise SPMValueError("spms must be a list of SPM names")
    for n in names:
        check_name(n)
    if metric not in functional.METRICS:
        raise SPMValueError(f"unknown gate metric {metric!r}; choose one of {', '.join(functional.METRICS)}")
    gate = GateSettings(enabled=flag(ft, "ft"), factor=number(factor, "FT factor", 0.0, MAX_FACTOR), metric=metric)
    return TestRequest(check_prompts(prompts), list(dict.fromkeys(names)), gate)


def parse_api(body, defaults: GateSettings) -> TestRequest:
    """A ``/spm/v1/gates`` body: ``prompts`` (a list, or text with one per line), ``spms``, and
    optionally ``ft``/``factor``/``metric`` (the host's defaults otherwise). Unknown keys are refused."""
    if not isinstance(body, dict):
        raise SPMValueError("the request body must be a JSON object")
    extra = sorted(set(body) - set(API_KEYS))
    if extra:
        raise SPMValueError(f"unknown field(s) {', '.join(map(repr, extra))}; known: {', '.join(API_KEYS)}")
    if "prompts" not in body:
        raise SPMValueError("'prompts' is required: a list of prompts")
    prompts = body["prompts"]
    prompts = split_prompts(prompts) if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list):
        raise SPMValueError("prompts must be a list of strings")
    return make_request(prompts, body.get("spms", []), body.get("ft", defaults.enabled),
                        body.get("factor", defaults.factor), body.get("metric", defaults.metric))


# -- the work ------------------------------------------------------------------------------------

def gates(host: UIHost, req: TestRequest) -> tuple[GateReport, str]:
    """The report for the user's SPMs and every enforced one, and the host's note on its rows.

    An enforced SPM that cannot be read is reported as skipped (generation is refused then); a
    user's SPM that cannot be read is the request's error."""
    enforced = host.enforced()
    locked = {name for name, _, _ in enforced}
    probes, broken = [], {}
    for name, _, gate in enforced:
        try:
            probes.append(Probe(name, host.library.load(name), gate, enforced=True))
        except SPMError as e:
            broken[name] = f"enforced, but cannot be used: {e}"
    probes += [Probe(n, host.library.load(n), req.gate) for n in req.names if n not in locked]
    if not probes:
        raise SPMValueError("choose at least one SPM")
    with host.gate_probe() as probe:
        rep = report(probe.unet, probes, req.prompts, probe.rows, probe.encoder)
    rep.skipped.update(broken)
    return rep, probe.note


def api(host: UIHost, body) -> dict:
    """``POST /spm/v1/gates``: the gate table as JSON (errors raise :class:`SPMError`)."""
    rep, note = gates(host, parse_api(body, host.gate_defaults()))
    return {**rep.as_dict(), "note": note}


def images(host: UIHost, req: TestRequest, seed) -> list[tuple[object, str]]:
    """Gallery items: each of the first prompts without, then with, the user's SPMs."""
    seed = int(number(seed, "seed", 0, 2**31 - 1))
    spms = [(host.library.load(n), 1.0) for n in req.names]
    pairs = host.test_images(req.prompts[:IMAGE_PROMPTS], spms, req.gate, seed) or []
    out = []
    for prompt, (before, after) in zip(req.prompts, pairs):
        out += [(before, f"without: {prompt}"), (after, f"with: {prompt}")]
    return out


def run(host: UIHost, names, text, ft, factor, metric, want_images, seed):
    """The button: (table HTML, gallery items)."""
    try:
        req = make_request(split_prompts(text), names, ft, factor, metric)
        rep, note = gates(host, req)
        shown = images(host, req, seed) if want_images and req.names else []
    except SPMError as e:
        return f"<p class='spm-bad'>{html.escape(str(e))}</p>", []
    return render(rep, note), shown


# -- showing it ----------------------------------------------------------------------------------

def _cell(g: float) -> str:
    # shaded by the gate: the SPM acts in proportion to it
    return (f"<td class='spm-gate' data-gate='{g:.4f}' style='background: rgba(214, 69, 65, {0.55 * g:.2f})'>"
            f"{g:.2f}</td>")


def render(rep: GateReport, note: str = "") -> str:
    labels = rep.slices
    enforced = {v.slice for v in rep.values if v.enforced}
    by_key = {(v.slice, v.prompt, v.part, v.chunk): v.gate for v in rep.values}
    head = "".join(f"<th>{'&#128274; ' if s in enforced else ''}{html.escape(s)}</th>" for s in labels)
    body = []
    for i, (prompt, parts, counts) in enumerate(zip(rep.prompts, rep.parts, rep.chunks)):
        for j, (part, k) in enumerate(zip(parts, counts)):
            lines = [(None, part.label or "prompt")] + ([(c, f"chunk {c + 1}/{k}") for c in range(k)] if k > 1 else [])
            for chunk, what in lines:
                first = j == 0 and chunk is None
                text = html.escape(prompt) if first else ""
                cls = " class='spm-test-sub'" if chunk is not None else ""
                cells = "".join(_cell(by_key[(s, i, j, chunk)]) if (s, i, j, chunk) in by_key else "<td></td>"
                                for s in labels)
                body.append(f"<tr{cls}><td>{text}</td><td>{html.escape(what)}</td>{cells}</tr>")
    settings = "; ".join(f"{html.escape(n)}: " + (f"FT {g.metric} x{g.factor:g}" if g.enabled else "FT off")
                         for n, g in rep.settings.items())
    extra = "".join(f"<li class='spm-bad'>{html.escape(n)}: {html.escape(w)}</li>" for n, w in rep.skipped.items())
    out = (f"<table class='spm-test'><thead><tr><th>Prompt</th><th>Row</th>{head}</tr></thead>"
           f"<tbody>{''.join(body)}</tbody></table>" if labels else "")
    legend = " &#128274; enforced by the operator." if enforced else ""
    out += f"<p class='spm-test-note'>Gate settings: {settings or '(none)'}.{legend}</p>"
    if note:
        out += f"<p class='spm-test-note'>{html.escape(note)}</p>"
    if extra:
        out += f"<ul>{extra}</ul>"
    return out


def build(host: UIHost, changed) -> None:
    """The panel inside the caller's Blocks; ``changed`` refreshes the SPM list."""
    import gradio as gr

    from . import gradio_compat

    d = host.gate_defaults()
    no_images = host.images_unavailable()
    with gr.Row():
        with gr.Column():
            text = gr.Textbox(label="Prompts, one per line", lines=5, elem_id="spm_test_prompts",
                              placeholder="a red circle\na photo of a dog AND a circle")
            names = gr.Dropdown(label="SPMs", choices=_choices(host), value=[], multiselect=True,
                                elem_id="spm_test_spms")
            with gr.Row():
                ft = gr.Checkbox(d.enabled, label="Facilitated Transport", elem_id="spm_test_ft")
                factor = gr.Slider(0.0, 4.0, value=d.factor, step=0.05, label="FT factor", elem_id="spm_test_factor")
                metric = gr.Dropdown(list(functional.METRICS), value=d.metric, label="FT metric",
                                     elem_id="spm_test_metric")
            with gr.Row(visible=no_images is None):
                want = gr.Checkbox(False, label="Before/after images", elem_id="spm_test_images")
                seed = gr.Number(0, precision=0, label="Seed", elem_id="spm_test_seed")
            if no_images:
                gr.HTML(f"<p class='spm-test-note'>{html.escape(no_images)}</p>", elem_id="spm_test_no_images")
            go = gr.Button("Show gates", variant="primary", elem_id="spm_test_run")
        with gr.Column():
            table = gr.HTML(elem_id="spm_test_table")
            gallery = gr.Gallery(label="Without / with the SPMs", columns=2, visible=no_images is None,
                                 elem_id="spm_test_gallery")

    def on_changed(selected):
        choices = _choices(host)
        return gradio_compat.update(choices=choices, value=[n for n in selected or [] if n in choices])

    changed.change(on_changed, inputs=[names], outputs=[names])
    go.click(lambda *a: run(host, *a), inputs=[names, text, ft, factor, metric, want, seed], outputs=[table, gallery])


def _choices(host: UIHost) -> list[str]:
    return [e.name for e in host.library.entries() if e.error is None]
