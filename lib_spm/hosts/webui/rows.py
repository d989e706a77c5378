"""Which text each batch row holds, and its tokens, as the AUTOMATIC1111 WebUI (v1.10.1) lays rows out.

Everything here takes WebUI objects (or duck-typed stand-ins) as arguments; the WebUI's own
modules are looked up (:mod:`.gateway`) only as a default when no stand-in is given. Per
generation, a host does::

    rows = WebUIRows.for_model(shared.sd_model)
    session = Session(unet_of(shared.sd_model), spms, encoder=WebUIConcepts(shared.sd_model),
                      conditioning_of=rows.conditioning_of, row_tokens=rows)

and its ``on_cfg_denoiser`` callback (registered once, at load) forwards to the active
``rows.on_cfg_denoiser(params)``.

Batch rows (``CFGDenoiser.forward``, shared by the k-diffusion and the timestep samplers): one
cond row per (image, AND sub-prompt) in image order, then one uncond row per image. Every branch
of that method hands the UNet consecutive slices of this one list, in order: all of it at once
(``batch_cond_uncond``), slices of ``images`` rows (off), cond slices of ``2 * images`` /
``images`` rows and then the uncond rows when prompt and negative prompt have different token
lengths and no padding option is on, or the cond rows alone when uncond is skipped (NGMS
``s_min_uncond``, ``skip_early_cond``). So :class:`WebUIRows` walks the list by position and
accepts a call only if its batch size is the next one of some sequence :func:`call_plans` allows
for the step; it also compares each call's conditioning with the step's rows when it has them.
Anything else gets ``None``: the runtime then gates those rows by the cosine alone.

Covered: ``AND`` (each sub-prompt its own row, weights kept), a negative prompt per image (never
split on ``AND``, as the WebUI does not), prompt editing and alternation at the denoiser's step
through the WebUI's own ``prompt_parser`` (hires pass prompts and steps, old scheduling too),
``batch_cond_uncond`` off, skipped uncond, unequal cond/uncond lengths with and without
``pad_cond_uncond``/``pad_cond_uncond_v0`` (v0 truncation: tokens cut to the chunks the UNet
sees), SDXL dict conditioning, InstructPix2Pix (image CFG != 1: rows cond, uncond, uncond) in the
equal-length branch.

Not covered, so those rows get ``None``: UNet calls that do not come from ``CFGDenoiser.forward``
or that another extension reshapes (reference-only ControlNet, tiled diffusion; the refiner's
second UNet has no hooks anyway), unless their size and conditioning are exactly the step's next
rows, which then hold those texts; InstructPix2Pix with unequal lengths or skipped uncond (the
WebUI itself fails there); steps without an ``on_cfg_denoiser`` call. Approximations: textual
inversion embeddings show as the WebUI's placeholder id 0 at their positions; SDXL's second text
encoder is assumed to chunk like the first (same BPE vocabulary); ``use_old_emphasis_implementation``
chunks differently from ``process_texts`` and is not modelled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ...errors import SPMRuntimeError, SPMShapeError, SPMValueError
from .gateway import webui
from .model import conditioning_of, is_forge

CHUNK = 77  # tokens per encoded chunk: start, 75 prompt tokens, end (sd_hijack_clip)


def _webui_opts():
    return webui("shared").opts


def _crossattn(cond):
    """The text part of a WebUI conditioning: the tensor itself, or SDXL's ``cond['crossattn']``."""
    return cond["crossattn"] if isinstance(cond, dict) else cond


# -- tokens --------------------------------------------------------------------------------------

class PromptTokens:
    """Token ids of prompts as the WebUI's text-encoder wrapper lays them out in chunks.

    ``cond_stage_model.process_texts`` (SD1, SD2, and SDXL's conditioner, which forwards to its
    first embedder) is the WebUI's own chunking: emphasis syntax removed, ``BREAK``, comma
    backtracking, embeddings. Models without it fall back to ``tokenize`` (or a Hugging Face
    ``tokenizer``) cut into 75-token chunks. Results are cached per text: make one per model.
    """

    def __init__(self, sd_model, chunk: int = CHUNK):
        self.model = getattr(sd_model, "cond_stage_model", None)
        if self.model is None:
            raise SPMRuntimeError("this model has no cond_stage_model to tokenize prompts with")
        self.per_chunk = chunk - 2
        self._cache: dict[str, tuple[list[tuple[int, ...]], int | None]] = {}

    def chunks(self, text: str) -> list[tuple[int, ...]]:
        """The prompt tokens of each chunk, start/end/padding excluded."""
        return self._entry(text)[0]

    def tokens(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """Each text's tokens in order, special tokens excluded."""
        return [sum(self.chunks(t), ()) for t in texts]

    def row(self, text: str) -> tuple[int, ...]:
        """A row's tokens with every chunk but the last filled to 75 by the WebUI's own padding id.

        ``lib_spm.runtime.functional`` locates tokens by count (75 per chunk); the WebUI ends a chunk
        early at ``BREAK``, at a comma within ``comma_padding_backtrack`` tokens of the limit and
        before an embedding that does not fit. Filling keeps every token at its real position.
        The filler is the end/padding id, which no concept's tokens contain, so token overlap is
        unchanged.
        """
        chunks, filler = self._entry(text)
        out: list[int] = []
        for c in chunks[:-1]:
            out += c
            out += [filler] * (self.per_chunk - len(c))
        return tuple(out) + chunks[-1]

    def __call__(self, text: str) -> tuple[int, ...]:
        return self.row(text)

    def _entry(self, text: str):
        hit = self._cache.get(text)
        if hit is None:
            hit = self._cache[text] = self._tokenize(text)
        return hit

    def _tokenize(self, text: str):
        process = getattr(self.model, "process_texts", None)
        if callable(process):
            (chunks,), _ = process([text])
            out = []
            for c in chunks:
                body, end = list(c.tokens[1:-1]), c.tokens[-1]
                while body and body[-1] == end:
                    body.pop()
                out.append(tuple(body))
            return out, chunks[-1].tokens[-1]
        ids = self._plain(text)
        n = self.per_chunk
        return [tuple(ids[i : i + n]) for i in range(0, max(len(ids), 1), n)], None

    def _plain(self, text: str) -> list[int]:
        tokenize = getattr(self.model, "tokenize", None)
        if callable(tokenize):
            return list(tokenize([text])[0])
        tok = getattr(self.model, "tokenizer", None)
        if tok is not None:
            special = set(getattr(tok, "all_special_ids", ()))
            return [i for i in tok(text, add_special_tokens=False)["input_ids"] if i not in special]
        raise SPMRuntimeError("cond_stage_model has neither process_texts, tokenize nor tokenizer")


# -- concepts ------------------------------------------------------------------------------------

class WebUIConcepts:
    """ConceptEncoder: concepts encoded by ``sd_model.get_learned_conditioning`` exactly as prompts.

    A concept is one chunk (``chunk`` tokens); a longer one keeps its first chunk, and its tokens
    are cut the same way so both views agree.
    """

    def __init__(self, sd_model, chunk: int = CHUNK, tokens: PromptTokens | None = None):
        self.sd_model = sd_model
        self.chunk = chunk
        self._tokens = tokens or PromptTokens(sd_model, chunk)

    def encode(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad(), _autocast():
            cond = _crossattn(self.sd_model.get_learned_conditioning(list(texts)))
        if cond.dim() != 3 or cond.shape[0] != len(texts) or cond.shape[1] < self.chunk:
            raise SPMShapeError(f"get_learned_conditioning gave {tuple(cond.shape)} for {len(texts)} texts")
        return cond[:, : self.chunk]

    def tokens(self, texts: list[str]) -> list[tuple[int, ...]]:
        return [self._tokens.chunks(t)[0] for t in texts]


def _autocast():
    try:
        return webui("devices").autocast()
    except ImportError:
        return contextlib.nullcontext()


# -- which text each row holds ---------------------------------------------------------------

class RowTexts:
    """The text behind every row the CFG denoiser builds for one batch of images, at any step.

    ``parser`` is the WebUI's ``modules.prompt_parser`` (or a stand-in with the same two
    functions): the WebUI's own ``AND`` split and prompt-editing schedules, so texts are exactly
    those it encoded. ``steps``/``hires_steps``/``use_old_scheduling`` are the arguments the WebUI
    passed when it encoded them (``p.firstpass_steps``, the hires pass's total steps).
    """

    def __init__(self, prompts: Sequence[str], negative_prompts: Sequence[str], steps: int, *,
                 hires_steps: int | None = None, use_old_scheduling: bool = False, parser=None):
        if len(prompts) != len(negative_prompts):
            raise SPMValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
        parser = parser or webui("prompt_parser")
        indexes, flat, _ = parser.get_multicond_prompt_list(list(prompts))
        schedules = parser.get_learned_conditioning_prompt_schedules
        self.subprompts = [[(int(i), float(w)) for i, w in image] for image in indexes]  # (flat index, weight)
        self._cond = [[(int(e), str(t)) for e, t in s] for s in schedules(list(flat), steps, hires_steps,
                                                                        use_old_scheduling)]
        self._uncond = [[(int(e), str(t)) for e, t in s] for s in schedules(list(negative_prompts), steps,
                                                                          hires_steps, use_old_scheduling)]

    @classmethod
    def from_processing(cls, p, cond=None, uncond=None, *, opts=None, parser=None,
                        uncond_optional: bool = False) -> "RowTexts | None":
        """From a processing object and the conditioning the sampler uses (default ``p.get_conds()``).

        None if the texts do not reproduce the schedules of that conditioning (another script's
        prompts, or steps we cannot tell). ``uncond_optional``: an uncond of None (Forge at CFG 1
        encodes no negative prompt) is not compared.
        """
        if cond is None or (uncond is None and not uncond_optional):
            cond, uncond = p.get_conds()
        opts = opts if opts is not None else _webui_opts()
        old = bool(getattr(opts, "use_old_scheduling", False))
        try:
            seen = cond.batch[0][0].schedules[-1].end_at_step  # a schedule always ends at its steps
            if getattr(p, "is_hr_pass", False):
                texts = cls(p.hr_prompts, p.hr_negative_prompts, p.firstpass_steps, hires_steps=seen,
                            use_old_scheduling=old, parser=parser)
            else:
                texts = cls(p.prompts, p.negative_prompts, getattr(p, "firstpass_steps", None) or seen,
                            use_old_scheduling=old, parser=parser)
        except (AttributeError, IndexError, TypeError, SPMValueError):
            return None
        return texts if texts.matches(cond, uncond, uncond_optional=uncond_optional) else None

    @property
    def images(self) -> int:
        return len(self.subprompts)

    @property
    def cond_rows(self) -> int:
        return sum(len(s) for s in self.subprompts)

    def weights(self) -> list[list[float]]:
        return [[w for _, w in image] for image in self.subprompts]

    def cond(self, step: int) -> list[str]:
        return [_at(self._cond[i], step) for image in self.subprompts for i, _ in image]

    def uncond(self, step: int) -> list[str]:
        return [_at(s, step) for s in self._uncond]

    def rows(self, step: int, edit: bool = False) -> list[str]:
        """[cond per (image, sub-prompt)..., uncond per image] (InstructPix2Pix: uncond twice)."""
        uncond = self.uncond(step)
        return self.cond(step) + uncond + (uncond if edit else [])

    def matches(self, cond, uncond, uncond_optional: bool = False) -> bool:
        """Whether a WebUI multicond conditioning and uncond schedules have exactly our schedules."""
        try:
            ours = [[[e for e, _ in self._cond[i]] for i, _ in image] for image in self.subprompts]
            theirs = [[[s.end_at_step for s in c.schedules] for c in image] for image in cond.batch]
            ours_u = [[e for e, _ in s] for s in self._uncond]
            theirs_u = ours_u if uncond is None and uncond_optional else \
                [[s.end_at_step for s in schedule] for schedule in uncond]
        except (AttributeError, TypeError):
            return False
        return ours == theirs and ours_u == theirs_u


def _at(schedule: list[tuple[int, str]], step: int) -> str:
    """The entry the WebUI's reconstruct_*cond_batch picks: the first that ends at or after step
    (the first entry if none does)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[0][1]


def call_plans(cond_rows: int, images: int, *, batch_cond_uncond: bool, same_length: bool,
               edit: bool = False) -> list[tuple[int, ...]]:
    """Every sequence of UNet batch sizes ``CFGDenoiser.forward`` can make in one step.

    ``same_length``: cond and uncond have equal token lengths once the WebUI's padding options
    applied. The first plan has the uncond rows; the second (not for edit models) skips them.
    """
    C, B = cond_rows, images

    def slices(total: int, size: int) -> tuple[int, ...]:
        return tuple(min(size, total - a) for a in range(0, total, size))

    if edit:
        return [(C + 2 * B,) if batch_cond_uncond else slices(C + 2 * B, B)] if same_length else []
    if same_length:
        full = (C + B,) if batch_cond_uncond else slices(C + B, B)
    else:
        full = slices(C, 2 * B if batch_cond_uncond else B) + (B,)
    skipped = (C,) if batch_cond_uncond else slices(C, B)
    return [full, skipped]


@dataclass
class _Step:
    texts: list[str]
    plans: list[tuple[int, ...]]
    cond: torch.Tensor | None = None  # the step's cond rows [C, T, D] and uncond rows [B, T', D]
    uncond: torch.Tensor | None = None
    sizes: tuple[int, ...] = ()  # batch sizes of this step's calls so far
    broken: bool = False


class WebUIRows:
    """``row_tokens`` for :class:`~lib_spm.runtime.session.Session`: the tokens of each row of each UNet call.

    Call :meth:`on_cfg_denoiser` (the WebUI's ``on_cfg_denoiser`` callback) or :meth:`begin_step`
    before each denoiser step; pass :meth:`conditioning_of` to the session so each call's
    conditioning can be checked against the step's rows.
    """

    def __init__(self, tokens: Callable[[str], tuple[int, ...]], *, chunk: int = CHUNK, sd_model=None,
                 opts=None, parser=None):
        self._tokens = tokens
        self.chunk = chunk
        self._sd_model, self._opts, self._parser = sd_model, opts, parser
        self._step: _Step | None = None
        self._pending = None  # CFGDenoiserParams of a step not planned yet
        self._texts_cache: tuple | None = None  # (cond, uncond, RowTexts | None)
        self._last_cond: torch.Tensor | None = None

    @classmethod
    def for_model(cls, sd_model, **kw) -> "WebUIRows":
        return cls(PromptTokens(sd_model, kw.get("chunk", CHUNK)), sd_model=sd_model, **kw)

    # -- steps ---------------------------------------------------------------------------------
    def begin_step(self, texts: Sequence[str], plans: Sequence[tuple[int, ...]], cond=None, uncond=None) -> None:
        """Start a denoiser step whose rows hold ``texts`` and whose calls follow one of ``plans``."""
        self._pending = None
        self._step = _Step(list(texts), [tuple(p) for p in plans],
                           None if cond is None else _crossattn(cond), None if uncond is None else _crossattn(uncond))

    def on_cfg_denoiser(self, params) -> None:
        """The WebUI's ``on_cfg_denoiser`` callback. Planning waits for the step's first UNet
        call, so it sees the conditioning after every extension's callback changed it."""
        self._step = None
        self._pending = params

    def reset(self) -> None:
        self._step, self._pending, self._texts_cache, self._last_cond = None, None, None, None

    # -- per UNet call -------------------------------------------------------------------------
    def conditioning_of(self, args: tuple, kwargs: dict) -> torch.Tensor:
        self._last_cond = conditioning_of(args, kwargs)
        return self._last_cond

    def next_call(self, batch_size: int) -> list[str] | None:
        """The texts of the rows of the UNet call now starting, or None (and None for the rest
        of the step) if its batch size or conditioning fits no layout of the step."""
        ctx, self._last_cond = self._last_cond, None
        if self._pending is not None:
            params, self._pending = self._pending, None
            self._plan(params)
        step = self._step
        if step is None or step.broken:
            return None
        k = len(step.sizes)
        if not any(p[:k] == step.sizes and len(p) > k and p[k] == batch_size for p in step.plans):
            step.broken = True
            return None
        start = sum(step.sizes)
        if ctx is not None and ctx.shape[0] == batch_size and not self._same_rows(step, ctx, start):
            step.broken = True
            return None
        step.sizes += (batch_size,)
        return step.texts[start : start + batch_size]

    def __call__(self, batch_size: int) -> list[tuple[int, ...]] | None:
        ctx = self._last_cond
        texts = self.next_call(batch_size)
        if texts is None:
            return None
        rows = [tuple(self._tokens(t)) for t in texts]
        if ctx is not None:  # pad_cond_uncond_v0 cuts a longer negative prompt to the prompt's chunks
            keep = (ctx.shape[1] // self.chunk) * (self.chunk - 2)
            rows = [r[:keep] for r in rows]
        return rows

    def _same_rows(self, step: _Step, ctx: torch.Tensor, start: int) -> bool:
        if step.cond is None or step.uncond is None:
            return True
        C, B = step.cond.shape[0], step.uncond.shape[0]
        src = [step.cond[r] if r < C else step.uncond[(r - C) % B] for r in range(start, start + ctx.shape[0])]
        m = min([ctx.shape[1]] + [s.shape[0] for s in src])
        expected = torch.stack([s[:m] for s in src]).to(ctx.device, ctx.dtype)
        return torch.equal(ctx[:, :m], expected)

    # -- reading the WebUI's denoiser ----------------------------------------------------------
    def _plan(self, params) -> None:
        """Plan a step from ``CFGDenoiserParams`` and its ``denoiser`` (a CFGDenoiser)."""
        self._step = None
        d = params.denoiser
        opts = self._opts if self._opts is not None else _webui_opts()
        extra = getattr(getattr(d, "sampler", None), "sampler_extra_args", None) or {}
        c, uc = extra.get("cond"), extra.get("uncond")
        if c is None or uc is None:
            c, uc = d.p.get_conds()
        texts = self._row_texts(d.p, c, uc, opts)
        if texts is None:
            return
        cond, uncond = _crossattn(params.text_cond), _crossattn(params.text_uncond)
        if cond.shape[0] != texts.cond_rows or uncond.shape[0] != texts.images:
            return
        same = cond.shape[1] == uncond.shape[1] or bool(getattr(opts, "pad_cond_uncond_v0", False)) \
            or bool(getattr(opts, "pad_cond_uncond", False))
        sd_model = self._sd_model if self._sd_model is not None else webui("shared").sd_model
        scale = getattr(d, "image_cfg_scale", None)
        edit = getattr(sd_model, "cond_stage_key", None) == "edit" and scale is not None and scale != 1.0
        bcu = bool(getattr(opts, "batch_cond_uncond", True))
        plans = call_plans(texts.cond_rows, texts.images, batch_cond_uncond=bcu, same_length=same, edit=edit)
        self.begin_step(texts.rows(d.step, edit=edit), plans, cond, uncond)

    def _row_texts(self, p, c, uc, opts) -> RowTexts | None:
        cached = self._texts_cache
        if cached is not None and cached[0] is c and cached[1] is uc:
            return cached[2]
        texts = RowTexts.from_processing(p, c, uc, opts=opts, parser=self._parser)
        self._texts_cache = (c, uc, texts)
        return texts


# -- the host's flavour ----------------------------------------------------------------------

def tokens_for(sd_model) -> PromptTokens:
    """The prompt tokenizer of this model: the WebUI's, or Forge's text engine."""
    if is_forge(sd_model):
        from .forge import ForgeTokens

        return ForgeTokens(sd_model)
    return PromptTokens(sd_model)


def rows_for(tokens: PromptTokens, *, sd_model, opts=None):
    """A session's row reader for this model: the WebUI's ``CFGDenoiser`` layout, or Forge's."""
    if is_forge(sd_model):
        from .forge import ForgeRows

        return ForgeRows(tokens, opts=opts)
    return WebUIRows(tokens, sd_model=sd_model, opts=opts)
