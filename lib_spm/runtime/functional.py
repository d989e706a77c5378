"""Pure math of SPM application and Facilitated Transport gating: tensors in, tensors out.

Nothing here knows a model, a file or a host; the runtime calls these from its hooks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

METRICS = ("clipcos", "tokenuni", "clipcos_tokenuni", "pooled", "pooled_tokenuni")
CALIBRATED = ("pooled", "pooled_tokenuni")


# -- Facilitated Transport scores ---------------------------------------------------------------

def clip_cosine(cond: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Cosine of each row's flattened conditioning with each concept's: ``[B, T, D] x [C, L, D] -> [B, C]``.

    The published score flattens the whole padded ``L``-token encoding (L = 77). Hosts encode
    long prompts as several L-token chunks concatenated (T = k * L, the WebUI's 75-token chunks
    with their own start/end/padding): each chunk is scored as a prompt of its own and the row
    takes the best chunk, so a concept named anywhere in a long prompt opens the gate.
    """
    B, T, D = cond.shape
    C, L, Dc = concepts.shape
    if D != Dc:
        raise ValueError(f"conditioning width {D} != concept encoding width {Dc}")
    if T % L:
        raise ValueError(f"conditioning of {T} tokens is not a whole number of {L}-token chunks")
    rows = F.normalize(cond.float().reshape(B, T // L, L * D), dim=-1)
    cons = F.normalize(concepts.float().reshape(C, L * D), dim=-1)
    return torch.einsum("bkf,cf->bkc", rows, cons).amax(dim=1)


def token_overlap(rows: Sequence[Sequence[int] | None], concepts: Sequence[Sequence[int]]) -> torch.Tensor:
    """``|tokens(row) & tokens(concept)| / |tokens(concept)|`` over token sets; 0 where a row's tokens are unknown."""
    out = torch.zeros(len(rows), len(concepts))
    cons = [set(c) for c in concepts]
    for b, row in enumerate(rows):
        if row is None:
            continue
        row = set(row)
        for c, con in enumerate(cons):
            if con:
                out[b, c] = len(row & con) / len(con)
    return out


def content_mask(lengths: Sequence[int | None], T: int, L: int) -> torch.Tensor:
    """[B, T] positions that hold a prompt's own tokens: in each L-token chunk, the L-2 slots
    after the start token (a long prompt continues in the next chunk, as the WebUI encodes it)."""
    per = L - 2
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if n is None:
            continue
        for k in range(T // L):
            m = min(per, max(0, n - k * per))
            mask[b, k * L + 1 : k * L + 1 + m] = True
    return mask


def end_states(cond: torch.Tensor, lengths: Sequence[int | None], L: int) -> torch.Tensor:
    """[B, k, D]: the hidden state at each chunk's end token, which a causal CLIP text encoder
    computes from the whole chunk (for k > 1, chunks hold L-2 prompt tokens each). Rows of
    unknown length give NaN, and so do later chunks that hold none of the prompt.

    The positions come from the lengths (host integers), so this is one gather on the device.
    """
    B, T, D = cond.shape
    k, per = T // L, L - 2
    pos = torch.zeros(B, k, dtype=torch.long)
    used = torch.zeros(B, k, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if n is None:
            continue
        for j in range(k):
            m = min(per, max(0, n - j * per))  # prompt tokens in chunk j
            if j == 0 or m > 0:
                pos[b, j], used[b, j] = j * L + m + 1, True
    pos, used = pos.to(cond.device), used.to(cond.device)
    ends = cond.gather(1, pos[:, :, None].expand(B, k, D)).float()
    return ends.masked_fill(~used[:, :, None], float("nan"))


def pooled_cosine(cond, row_lengths, concepts, concept_lengths, null: torch.Tensor) -> torch.Tensor:
    """Cosine of end-token states, both centred on the empty prompt's: ``[B, C]``, best chunk.

    Centring removes what every prompt shares (position, the start token's influence), so what
    remains is what the prompt says. Rows of unknown length give NaN (the caller falls back).
    The result stays on ``cond``'s device.
    """
    L = concepts.shape[1]
    base = null[0, 1].float()  # the empty prompt's end token sits right after its start token
    rows = end_states(cond, row_lengths, L) - base.to(cond.device)
    cons = end_states(concepts, concept_lengths, L)[:, 0] - base.to(concepts.device)
    sim = torch.einsum("bkd,cd->bkc", F.normalize(rows, dim=-1), F.normalize(cons.to(rows.device), dim=-1))
    best = torch.nan_to_num(sim, nan=-2.0).amax(dim=1)  # unused chunks never win
    known = torch.tensor([n is not None for n in row_lengths], device=best.device)
    return best.masked_fill(~known[:, None], float("nan"))


def calibrate(scores: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Rescale so the concept itself scores 1 and unrelated prompts (on average) 0."""
    floor = floor.to(scores.device)
    return ((scores - floor) / (1 - floor).clamp_min(1e-6)).clamp(0, 1)


def concept_scores(
    metric: str,
    cond: torch.Tensor,
    concept_embeds: torch.Tensor,
    row_tokens: Sequence[Sequence[int] | None],
    concept_tokens: Sequence[Sequence[int]],
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """gamma per (row, concept) for one of :data:`METRICS`: the max of the scores it names.

    Computed on ``cond``'s device without waiting for it: what is known about rows (their
    tokens) comes from the host, so no branch reads a tensor value.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown gate metric {metric!r}; choose one of {METRICS}")
    parts = []
    if metric in CALIBRATED:
        if calibration is None:
            raise ValueError(f"metric {metric!r} needs the empty prompt's encoding and per-concept floors")
        null, floor = calibration
        raw = pooled_cosine(cond, [None if r is None else len(r) for r in row_tokens], concept_embeds,
                            [len(t) for t in concept_tokens], null)
        scored = calibrate(raw, floor)
        if any(r is None for r in row_tokens):  # rows whose prompt text is unknown: the cosine alone decides
            scored = torch.where(raw.isnan(), clip_cosine(cond, concept_embeds), scored)
        parts.append(scored)
    if "clipcos" in metric:
        parts.append(clip_cosine(cond, concept_embeds))
    if "tokenuni" in metric:
        parts.append(token_overlap(row_tokens, concept_tokens).to(cond.device))
    return torch.stack(parts).amax(dim=0)


def slice_gates(scores: torch.Tensor, groups: Sequence[Sequence[int]], factor: float) -> torch.Tensor:
    """Gate of each slice: ``clamp(factor * max over its concepts, 0, 1)``: ``[B, C] -> [B, S]``.

    A slice without concepts cannot be gated and stays fully open.
    """
    cols = []
    for idx in groups:
        if idx:
            cols.append(scores[:, list(idx)].amax(dim=1))
        else:
            cols.append(torch.ones(scores.shape[0], device=scores.device))
    return (torch.stack(cols, dim=1) * factor).clamp(0.0, 1.0)


# -- the adapted layer --------------------------------------------------------------------------

def lowrank_bypass(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    coef: torch.Tensor,
    conv: dict | None = None,
) -> torch.Tensor:
    """``sum_i coef[row, i] * up[:, i] (down[i] x)`` for all stacked rank columns in one product.

    ``down`` is ``[R, in]`` (Linear) or ``[R, in, kh, kw]`` (Conv2d, with ``conv`` holding the
    layer's stride/padding/dilation); ``up`` is ``[out, R]`` or ``[out, R, 1, 1]``; ``coef`` is
    ``[B, R]``: each column's gate x strength x alpha/rank for each batch row.
    """
    B = x.shape[0]
    if conv is None:
        h = F.linear(x, down)
        h = h * coef.reshape(B, *([1] * (h.dim() - 2)), -1)
        return F.linear(h, up)
    h = F.conv2d(x, down, None, **conv)
    h = h * coef.reshape(B, -1, 1, 1)
    return F.conv2d(h, up)


def add_lowrank_bypass_(
    output: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    coef: torch.Tensor,
) -> torch.Tensor:
    """``output += lowrank_bypass(x, down, up, coef)`` for a Linear layer, in one fused product.

    The out-of-place sum streams two output-sized tensors through memory (the up-projection's
    result, then the sum); ``addmm_`` accumulates the up-projection into ``output`` itself, which
    is what the runtime's cost per call is made of (BENCHMARKS.md). The caller owns ``output``:
    it must be contiguous, fill its own storage, and be seen by nobody else.
    """
    B = x.shape[0]
    R = down.shape[0]
    h = F.linear(x, down)
    h = h * coef.reshape(B, *([1] * (h.dim() - 2)), -1)
    output.view(-1, output.shape[-1]).addmm_(h.reshape(-1, R), up.t())
    return output

