"""The Manage panel of the SPM tab: browse the SPM folder, read a file's metadata, edit its
targets and description, rename and delete.

The handlers are plain functions of the host and the panel's inputs; ``build`` only lays out the
components and wires them. Everything that comes from a file or a user (names, concepts,
descriptions, raw metadata) is hostile input and is HTML-escaped before it reaches the page.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import SPMError
from ..operations.library import UNGATED, Entry, human_size

if TYPE_CHECKING:
    from .host import UIHost

HEADERS = ["name", "targets", "architecture", "rank", "size", "date", "hash"]
MAX_VALUE_CHARS = 4000  # of one raw metadata value on the page

CONFIRM_DELETE_JS = """
function(name, confirmed) {
    return [name, !!name && confirm("Delete the SPM " + JSON.stringify(name) + " and its preview and sidecar files?")];
}
"""


@dataclass(frozen=True)
class Outcome:
    """What a file operation did: a status line (HTML) and the name to select afterwards."""

    message: str
    ok: bool
    name: str | None = None


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ok(text: str) -> str:
    return f'<span class="spm-ok">{text}</span>'


def _error(text: str) -> str:
    return f'<span class="spm-error" style="color: var(--error-text-color, #d00)">{text}</span>'


# -- handlers -------------------------------------------------------------------------------------

def arch_label(arch: str | None, model_arch: str | None) -> str:
    """The architecture cell: marked when it does or does not fit the loaded model."""
    if arch is None:
        return "?"
    if model_arch is None:
        return arch
    return f"{arch} ✓" if arch == model_arch else f"{arch} ✗ (model is {model_arch})"


def matches(entry: Entry, search: str) -> bool:
    """Every word of the search appears in the name, a target or the description (any case)."""
    hay = "\n".join((entry.name, *entry.targets, entry.description)).casefold()
    return all(word in hay for word in (search or "").casefold().split())


def table(host: UIHost, search: str = "") -> list[list]:
    """Rows of the table (columns :data:`HEADERS`), filtered by ``search``."""
    model = host.model_arch()
    rows = []
    for entry in host.library.entries():
        if matches(entry, search):
            row = entry.as_row()
            row[2] = arch_label(entry.arch, model) if not entry.error else "?"
            rows.append(row)
    return rows


def names(host: UIHost) -> list[str]:
    return [e.name for e in host.library.entries()]


def targets_text(targets: tuple[str, ...] | list[str]) -> str:
    """Comma-separated, or one per line when a concept holds a comma (see :func:`parse_targets_text`)."""
    return "\n".join(targets) if any("," in t for t in targets) else ", ".join(targets)


def parse_targets_text(text: str) -> list[str]:
    """One concept per line when the text has line breaks (so concepts may hold commas), else comma-separated."""
    parts = text.splitlines() if "\n" in (text or "").strip() else (text or "").split(",")
    return [p.strip() for p in parts if p.strip()]


def details(host: UIHost, name: str | None) -> tuple[str, str | None, str, str]:
    """(details HTML, preview image path or None, targets text, description) of one SPM."""
    if not name:
        return "", None, "", ""
    try:
        entry = host.library.get(name)
        return (
            details_html(entry, host.model_arch()),
            str(entry.preview) if entry.preview else None,
            targets_text(entry.targets),
            entry.description,
        )
    # a hostile file shows as an error line; the panel never fails because of one
    except (SPMError, OSError, RecursionError, ValueError, TypeError, OverflowError) as e:
        text = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        return _error(esc(" ".join(text.split())[:1000])), None, "", ""


def details_html(entry: Entry, model_arch: str | None = None) -> str:
    rows = [
        ("Targets", ", ".join(entry.targets) or UNGATED),
        ("Architecture", arch_label(entry.arch, model_arch)),
        ("Rank", entry.rank or "?"),
        ("Alpha", "?" if entry.alpha is None else f"{entry.alpha:g}"),
    ]
    if len(entry.slices) > 1:
        rows.append(("Slices", ", ".join(entry.slices)))
    if entry.surrogates:
        rows.append(("Surrogates", ", ".join(f"{k} → {v or '(neutral)'}" for k, v in entry.surrogates.items())))
    rows += [
        ("Size", human_size(entry.size_bytes)),
        ("Modified", entry.date),
        ("SHA-256", entry.sha256 or "?"),
        ("Description", entry.description or "none"),
    ]
    out = [f"<div class='spm-details'><h3>{esc(entry.name)}</h3>"]
    if entry.error:
        out.append(f"<p>{_error(esc(entry.error))}</p>")
    out.append("<table>")  # values may wrap anywhere: a long hash must not spill over the preview
    out += [f"<tr><th>{esc(k)}</th><td style='overflow-wrap: anywhere'>{esc(v)}</td></tr>" for k, v in rows]
    out.append("</table>")
    if entry.metadata:
        out.append(f"<details><summary>All metadata ({len(entry.metadata)} keys)</summary><table>")
        out += [f"<tr><th>{esc(k)}</th><td><pre style='white-space: pre-wrap'>{esc(_shown(v))}</pre></td></tr>"
                for k, v in sorted(entry.metadata.items())]
        out.append("</table></details>")
    out.append("</div>")
    return "".join(out)


def _shown(value: str) -> str:
    try:
        parsed = json.loads(value)
        if isinstance(parsed, (dict, list)):
            value = json.dumps(parsed, indent=1, ensure_ascii=False)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python parses
        pass
    return value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS] + f"… ({len(value)} characters)"


def rename(host: UIHost, old: str | None, new: str | None) -> Outcome:
    if not old:
        return Outcome(_error("Choose an SPM to rename."), False, None)
    try:
        entry = host.library.rename(old, (new or "").strip())
    except (SPMError, OSError) as e:
        return Outcome(_error(esc(e)), False, old)
    return Outcome(_ok(f"Renamed {esc(old)} to {esc(entry.name)}."), True, entry.name)


def delete(host: UIHost, name: str | None, confirmed: bool) -> Outcome:
    if not name:
        return Outcome(_error("Choose an SPM to delete."), False, None)
    if confirmed is not True:
        return Outcome(_ok(f"Nothing deleted: {esc(name)} stays."), False, name)
    try:
        host.library.delete(name)
    except (SPMError, OSError) as e:
        return Outcome(_error(esc(e)), False, name)
    return Outcome(_ok(f"Deleted {esc(name)}."), True, None)


def save_edit(host: UIHost, name: str | None, targets: str | None, description: str | None) -> Outcome:
    if not name:
        return Outcome(_error("Choose an SPM to edit."), False, None)
    try:
        entry = host.library.edit(name, targets=parse_targets_text(targets or ""), description=description or "")
    except (SPMError, OSError) as e:
        return Outcome(_error(esc(e)), False, name)
    return Outcome(_ok(f"Saved {esc(entry.name)}: targets {esc(', '.join(entry.targets))}."), True, entry.name)


# -- layout ---------------------------------------------------------------------------------------

def build(host: UIHost, changed, *, read_only: bool = False) -> dict:
    """Lay the panel out inside the caller's open Blocks/Tab. ``changed`` is the tab's hidden
    Textbox: a new value means some panel wrote, renamed or deleted a file. ``read_only``: the
    listing and details only; no control (and so no event handler a client could call) writes."""
    import gradio as gr

    from .gradio_compat import js, update

    def token(outcome: Outcome):
        return str(time.time_ns()) if outcome.ok else update()

    def choices(selected: str | None):
        all_names = names(host)
        return update(choices=all_names, value=selected if selected in all_names else None)

    def refresh(search, selected):
        return table(host, search) or [[""] * len(HEADERS)], choices(selected)

    def show(name):
        html_, preview, targets, description = details(host, name)
        return html_, preview, targets, description, name or ""

    def pick(rows, evt):
        rows = rows.values.tolist() if hasattr(rows, "values") else rows
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        name = rows[row][0] if rows and 0 <= row < len(rows) else None
        return update(value=name) if name else update()

    # gradio finds the event-data argument by its type hint; a real class, since this module's
    # postponed (string) annotations could not be resolved without gradio in its globals
    pick.__annotations__ = {"evt": gr.SelectData}

    def do_save(name, targets, description):
        outcome = save_edit(host, name, targets, description)
        return (outcome.message, token(outcome), *show(name))

    def do_rename(old, new):
        outcome = rename(host, old, new)
        return outcome.message, token(outcome), choices(outcome.name)

    def do_delete(name, confirmed):
        outcome = delete(host, name, confirmed)
        return outcome.message, token(outcome), choices(outcome.name)

    rows, all_names = table(host, ""), names(host)
    with gr.Row():
        search = gr.Textbox(label="Search", placeholder="name, target concept or description",
                            elem_id="spm_manage_search")
        refresh_button = gr.Button("Refresh", elem_id="spm_manage_refresh")
    frame = gr.Dataframe(value=rows or [[""] * len(HEADERS)], headers=HEADERS, datatype="str", type="array",
                         interactive=False, wrap=True, elem_id="spm_manage_table")
    with gr.Row():
        with gr.Column():
            select = gr.Dropdown(label="SPM", choices=all_names, value=None, elem_id="spm_manage_select")
            info = gr.HTML(elem_id="spm_manage_details")
        with gr.Column():
            preview = gr.Image(label="Preview", type="filepath", interactive=False, elem_id="spm_manage_preview")
    for event in (refresh_button.click, search.change, changed.change):
        event(refresh, inputs=[search, select], outputs=[frame, select])
    frame.select(pick, inputs=[frame], outputs=[select])
    if read_only:
        select.change(lambda name: show(name)[:2], inputs=[select], outputs=[info, preview])
        return {"search": search, "refresh": refresh_button, "table": frame, "select": select, "details": info,
                "preview": preview}
    targets = gr.Textbox(label="Target concepts (comma-separated, or one per line)", lines=2,
                         elem_id="spm_manage_targets")
    description = gr.Textbox(label="Description", lines=3, elem_id="spm_manage_description")
    save_button = gr.Button("Save targets and description", variant="primary", elem_id="spm_manage_save")
    with gr.Row():
        new_name = gr.Textbox(label="New name (folders with /)", elem_id="spm_manage_new_name")
        rename_button = gr.Button("Rename", elem_id="spm_manage_rename")
        delete_button = gr.Button("Delete", variant="stop", elem_id="spm_manage_delete")
    confirmed = gr.Checkbox(value=False, visible=False)  # filled by the confirm() dialog
    message = gr.HTML(elem_id="spm_manage_message")

    select.change(show, inputs=[select], outputs=[info, preview, targets, description, new_name])
    save_button.click(do_save, inputs=[select, targets, description],
                      outputs=[message, changed, info, preview, targets, description, new_name])
    rename_button.click(do_rename, inputs=[select, new_name], outputs=[message, changed, select])
    delete_button.click(do_delete, inputs=[select, confirmed], outputs=[message, changed, select],
                        **js(CONFIRM_DELETE_JS))
    return {"search": search, "refresh": refresh_button, "table": frame, "select": select, "details": info,
            "preview": preview, "targets": targets, "description": description, "save": save_button,
            "new_name": new_name, "rename": rename_button, "delete": delete_button, "message": message}
