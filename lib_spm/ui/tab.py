"""The SPM tab: Train, Manage, Merge and Test panels over one host, sharing one change signal.

Any panel that changes the SPM folder writes a new token into the hidden ``spm_library_changed``
Textbox; every panel listens to its ``change`` event and refreshes its lists, so a file trained
or merged in one panel appears in the others at once.
"""

from __future__ import annotations

import html

from .host import UIHost

LOCKED_TEST = ("The Test panel (gate values per prompt) is off on a locked server: they would show how to word "
               "a prompt so that the enforced SPMs stay shut. Test packs before locking.")


def build_tab(host: UIHost, *, read_only: str | None = None, **blocks_kwargs):
    """A ``gr.Blocks`` holding the whole tab (the WebUI adds it with ``on_ui_tabs``).

    ``read_only`` (the reason, shown on the tab): an operator's locked server; only the listing
    is built, so no handler that trains, merges, bakes or changes a file exists to be called.
    The Test panel is left out there too although it writes nothing: on a locked server the
    users are the ones the enforced SPMs moderate, and per-prompt gate values would let them
    search for wordings that close the gate (operators test a pack before locking)."""
    import gradio as gr

    from . import manage, merge, test_panel, train

    blocks_kwargs.setdefault("analytics_enabled", False)
    with gr.Blocks(**blocks_kwargs) as tab:
        changed = gr.Textbox(value="", visible=False, elem_id="spm_library_changed")
        if read_only:
            gr.HTML(f"<p class='spm-locked'>{html.escape(read_only)}</p>", elem_id="spm_read_only")
            with gr.Tabs(elem_id="spm_tabs"):
                with gr.Tab("Manage", elem_id="spm_tab_manage"):
                    manage.build(host, changed, read_only=True)
            gr.HTML(f"<p class='spm-test-note'>{html.escape(LOCKED_TEST)}</p>", elem_id="spm_test_locked")
            return tab
        with gr.Tabs(elem_id="spm_tabs"):
            with gr.Tab("Train", elem_id="spm_tab_train"):
                train.build(host, changed)
            with gr.Tab("Manage", elem_id="spm_tab_manage"):
                manage.build(host, changed)
            with gr.Tab("Merge", elem_id="spm_tab_merge"):
                merge.build(host, changed)
            with gr.Tab("Test", elem_id="spm_tab_test"):
                test_panel.build(host, changed)
    return tab
