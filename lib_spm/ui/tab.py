"""The SPM tab: Train, Manage and Merge panels over one host, sharing one change signal.

Any panel that changes the SPM folder writes a new token into the hidden ``spm_library_changed``
Textbox; every panel listens to its ``change`` event and refreshes its lists, so a file trained
or merged in one panel appears in the others at once.
"""

from __future__ import annotations

import html

from .host import UIHost


def build_tab(host: UIHost, *, read_only: str | None = None, **blocks_kwargs):
    """A ``gr.Blocks`` holding the whole tab (the WebUI adds it with ``on_ui_tabs``).

    ``read_only`` (the reason, shown on the tab): an operator's locked server; only the listing
    is built, so no handler that trains, merges, bakes or changes a file exists to be called."""
    import gradio as gr

    from . import manage, merge, train

    blocks_kwargs.setdefault("analytics_enabled", False)
    with gr.Blocks(**blocks_kwargs) as tab:
        changed = gr.Textbox(value="", visible=False, elem_id="spm_library_changed")
        if read_only:
            gr.HTML(f"<p class='spm-locked'>{html.escape(read_only)}</p>", elem_id="spm_read_only")
            with gr.Tabs(elem_id="spm_tabs"):
                with gr.Tab("Manage", elem_id="spm_tab_manage"):
                    manage.build(host, changed, read_only=True)
            return tab
        with gr.Tabs(elem_id="spm_tabs"):
            with gr.Tab("Train", elem_id="spm_tab_train"):
                train.build(host, changed)
            with gr.Tab("Manage", elem_id="spm_tab_manage"):
                manage.build(host, changed)
            with gr.Tab("Merge", elem_id="spm_tab_merge"):
                merge.build(host, changed)
    return tab
