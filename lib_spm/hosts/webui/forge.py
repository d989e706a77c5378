"""What differs in Stable Diffusion WebUI Forge (f2, on v1.10.1): tokens and batch rows.

Everything else of the WebUI host (arguments, tags, infotext, API, enforcement and the guard)
is shared; :mod:`.model` finds Forge's UNet and :mod:`.rows` picks these classes for a Forge
model (``rows.tokens_for`` / ``rows.rows_for``).

Tokens: Forge's ``sd_model.text_processing_engine`` (SDXL: ``text_processing_engine_l``; the
``_g`` engine chunks the same BPE text alike) has the WebUI's ``process_texts``.

Rows (``backend/sampling/sampling_function.py``): ``sampling_function`` turns the step's cond
into one entry per ``AND`` sub-prompt index ``j`` (``compile_weighted_conditions``: the j-th
sub-prompt of every image, ``images`` rows) and the uncond into one entry (``images`` rows),
absent at CFG 1 (and for NGMS / skip-early-CFG steps). ``calc_cond_uncond_batch`` queues
``[cond_0, ..., cond_n-1, uncond]`` and runs, per UNet call, the entries that concatenate with
the first one still queued, in reverse queue order (uncond first, then ``cond_n-1`` ... ``cond_0``),
as many as memory allows; ``transformer_options["cond_or_uncond"]`` (a keyword of the UNet call)
flags each chunk of ``images`` rows 0 (cond) or 1 (uncond). :class:`ForgeRows` reads those flags
from the call itself and labels each cond chunk with the unused sub-prompt whose conditioning the
chunk holds (checked against the step's tensors from ``on_cfg_denoiser``; reverse order breaks
ties, which only identical conditionings have). Calls it cannot place (no flags, another batch
size, a chunk matching nothing) get ``None``: the cosine alone gates them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...errors import SPMRuntimeError
from .model import conditioning_of
from .rows import CHUNK, PromptTokens, RowTexts, _crossattn, _webui_opts

COND, UNCOND = 0, 1  # calc_cond_uncond_batch's chunk flags


def text_engine(sd_model):
    """Forge's text processing engine (its ``process_texts`` chunks prompts as the WebUI does)."""
    for attr in ("text_processing_engine", "text_processing_engine_l"):
        engine = getattr(sd_model, attr, None)
        if engine is not None:
            return engine
    raise SPMRuntimeError(f"this Forge model ({type(sd_model).__name__}) has no text processing engine "
                          "to tokenize prompts with")


class ForgeTokens(PromptTokens):
    """:class:`~.rows.PromptTokens` through Forge's text processing engine."""

    def __init__(self, sd_model, chunk: int = CHUNK):
        self.model = text_engine(sd_model)
        self.per_chunk = chunk - 2
        self._cache = {}


class ForgeRows:
    """``row_tokens`` for a Session on Forge's UNet; also its ``conditioning_of``.

    Call :meth:`on_cfg_denoiser` each step (the WebUI callback, which Forge fires before
    ``sampling_function``)."""

    def __init__(self, tokens: Callable[[str], tuple[int, ...]], *, opts=None, parser=None):
        self._tokens = tokens
        self._opts, self._parser = opts, parser
        self._params = None
        self._step: _Step | None = None
        self._texts_cache: tuple | None = None  # (cond, uncond, RowTexts | None)
        self._call: tuple | None = None  # (context, cond_or_uncond) of the call now starting

    def on_cfg_denoiser(self, params) -> None:
        self._params, self._step = params, None

    def reset(self) -> None:
        self._params, self._step, self._texts_cache, self._call = None, None, None, None

    def conditioning_of(self, args: tuple, kwargs: dict) -> torch.Tensor:
        ctx = conditioning_of(args, kwargs)
        options = kwargs.get("transformer_options")
        flags = options.get("cond_or_uncond") if isinstance(options, dict) else None
        self._call = (ctx, list(flags) if isinstance(flags, (list, tuple)) else None)
        return ctx

    def __call__(self, batch_size: int) -> list[tuple[int, ...]] | None:
        texts = self.next_call(batch_size)
        return None if texts is None else [tuple(self._tokens(t)) for t in texts]

    def next_call(self, batch_size: int) -> list[str] | None:
        """The texts of the rows of the UNet call now starting, or None if it cannot be placed."""
        call, self._call = self._call, None
        if call is None or call[1] is None:
            return None
        if self._step is None and self._params is not None:
            self._step = self._plan(self._params)
        step = self._step
        if step is None:
            return None
        return step.place(call[0], call[1], batch_size)

    def _plan(self, params) -> "_Step | None":
        d = params.denoiser
        extra = getattr(getattr(d, "sampler", None), "sampler_extra_args", None) or {}
        c, uc = extra.get("cond"), extra.get("uncond")
        if c is None:
            c, uc = d.p.get_conds()
        texts = self._row_texts(d.p, c, uc)
        if texts is None:
            return None
        cond = _crossattn(params.text_cond)
        uncond = None if params.text_uncond is None else _crossattn(params.text_uncond)
        if cond.shape[0] != texts.cond_rows or (uncond is not None and uncond.shape[0] != texts.images):
            return None
        return _Step(texts, d.step, cond, uncond)

    def _row_texts(self, p, c, uc) -> RowTexts | None:
        cached = self._texts_cache
        if cached is not None and cached[0] is c and cached[1] is uc:
            return cached[2]
        opts = self._opts if self._opts is not None else _webui_opts()
        texts = RowTexts.from_processing(p, c, uc, opts=opts, parser=self._parser, uncond_optional=True)
        self._texts_cache = (c, uc, texts)
        return texts


class _Step:
    """One denoiser step's chunks: cond sub-prompt ``j`` (the j-th sub-prompt of every image, as
    ``compile_weighted_conditions`` transposes them) and the uncond."""

    def __init__(self, texts: RowTexts, step: int, cond: torch.Tensor, uncond: torch.Tensor | None):
        self.images = texts.images
        flat = texts.cond(step)
        starts = [sum(len(s) for s in texts.subprompts[:b]) for b in range(self.images)]
        parts = min(len(s) for s in texts.subprompts)  # Forge's zip(*weights) keeps the shortest
        self.cond_rows = [[starts[b] + j for b in range(self.images)] for j in range(parts)]
        self.cond_texts = [[flat[r] for r in rows] for rows in self.cond_rows]
        self.uncond_texts = texts.uncond(step)
        self.cond, self.uncond = cond, uncond
        self.used: set[int] = set()

    def place(self, ctx: torch.Tensor, flags: Sequence[int], batch_size: int) -> list[str] | None:
        B = self.images
        if batch_size != B * len(flags) or ctx.shape[0] != batch_size:
            return None
        out: list[str] = []
        for k, flag in enumerate(flags):
            chunk = ctx[k * B:(k + 1) * B]
            if flag == UNCOND:
                if self.uncond is not None and not _same(chunk, self.uncond):
                    return None
                out += self.uncond_texts
                continue
            j = next((j for j in reversed(range(len(self.cond_rows)))
                      if j not in self.used and _same(chunk, self.cond[self.cond_rows[j]])), None)
            if j is None:
                return None
            self.used.add(j)
            out += self.cond_texts[j]
        return out


def _same(chunk: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a call's chunk holds these rows (Forge repeats shorter conditionings to a common
    length when it concatenates, so the shared prefix is compared)."""
    m = min(chunk.shape[1], expected.shape[1])
    return torch.equal(chunk[:, :m], expected[:, :m].to(chunk.device, chunk.dtype))
