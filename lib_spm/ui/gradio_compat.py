"""The few places where gradio 3.41 (AUTOMATIC1111 1.10) and gradio 4.x (Forge) differ."""

from __future__ import annotations


def _major() -> int:
    import gradio

    return int(gradio.__version__.split(".")[0])


def js(code: str | None) -> dict:
    """Keyword for a client-side function on an event: ``_js`` in gradio 3, ``js`` in gradio 4."""
    if code is None:
        return {}
    return {"_js": code} if _major() < 4 else {"js": code}


def queue_kwargs(concurrency: int) -> dict:
    """``Blocks.queue`` keywords allowing ``concurrency`` events at once (standalone serving only)."""
    return {"concurrency_count": concurrency} if _major() < 4 else {"default_concurrency_limit": concurrency}


def update(**kw):
    """A property update for a component, in both gradio 3 and 4."""
    import gradio as gr

    return gr.update(**kw)
