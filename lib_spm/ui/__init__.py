"""The SPM tab (Train / Manage / Merge) as Gradio blocks, over a :class:`~lib_spm.ui.host.UIHost`.

Gradio is imported only inside the ``build_*`` functions, so the handlers (plain functions of
the host and their inputs) are importable and tested without it. Written for gradio 3.41
(AUTOMATIC1111 1.10) and kept to the API that gradio 4.x (Forge) also has.
"""
