"""What each SPM's Facilitated Transport gate is for given prompts, per row and per chunk.

A host says how a prompt becomes rows (:class:`PromptRows`: its ``AND`` parts, each part's text
conditioning exactly as the UNet receives it, and the tokens its ``row_tokens`` hands the
runtime); :func:`report` scores every row with :meth:`Session.gates`, the very function the
runtime's UNet pre-hook calls, so the reported gate of a row is the gate the runtime applies to it.

Each 75-token chunk of a long prompt is also scored as a prompt of its own: the runtime takes a
row's best chunk, so the chunk values show where in a long prompt the concept opened the gate
(the row's gate can exceed its best chunk's only when a concept's words span two chunks: the
token score counts the whole row).

The gates are computed on a :class:`Session` attached to the host's UNet (that is where it learns
the concepts' encodings and calibration); no UNet call is made and the session is detached before
this returns, but the caller must hold the model so no generation runs meanwhile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

import torch
import torch.nn as nn

from ..errors import ArchitectureMismatch, SPMKeyError, SPMShapeError, SPMValueError, UnresolvedKeysError
from ..format.spm_file import SPMFile
from .gating import GateSettings
from .session import Session

if TYPE_CHECKING:  # gating may move out of session.py; only Session and GateSettings are promised there
    from .gating import ConceptEncoder

MAX_PROMPTS = 32
MAX_PROMPT_CHARS = 4000
# what an SPM that does not suit the loaded UNet raises when attached: reported, not fatal
_DOES_NOT_FIT = (ArchitectureMismatch, UnresolvedKeysError, SPMShapeError, SPMKeyError)


@dataclass(frozen=True)
class Part:
    """One row a prompt makes: ``label`` says which (``""`` for a prompt that is one row)."""

    label: str
    text: str


class PromptRows(Protocol):
    """How a host turns a prompt into UNet rows."""

    chunk: int  # tokens per encoded chunk (77: start, 75 prompt tokens, end)

    def parts(self, prompt: str) -> list[Part]:
        """The rows one prompt makes (its ``AND`` sub-prompts, edits at their steps)."""

    def conditioning(self, text: str) -> torch.Tensor:
        """``[1, chunk * k, D]``: the text conditioning of a row holding ``text``, as the UNet gets it."""

    def row_tokens(self, text: str) -> tuple[int, ...]:
        """The tokens the host's ``row_tokens`` gives the runtime for that row (chunks filled to 75)."""


@dataclass(frozen=True)
class Probe:
    """An SPM to report on, with the gate settings it acts with."""

    name: str
    spm: SPMFile
    gate: GateSettings
    enforced: bool = False


@dataclass(frozen=True)
class GateValue:
    prompt: int  # index into the report's prompts
    part: int  # index into that prompt's parts
    chunk: int | None  # None: the row as the runtime gates it; k: its k-th chunk scored alone
    spm: str
    slice: str  # ``spm`` or ``spm:slice`` for packs whose slices gate apart
    enforced: bool
    gate: float


@dataclass
class GateReport:
    prompts: list[str]
    parts: list[list[Part]]
    chunks: list[list[int]]  # chunks per part
    values: list[GateValue] = field(default_factory=list)
    settings: dict[str, GateSettings] = field(default_factory=dict)  # per reported SPM
    skipped: dict[str, str] = field(default_factory=dict)  # SPM -> why it has no gates here

    @property
    def slices(self) -> list[str]:
        return list(dict.fromkeys(v.slice for v in self.values))

    def gate(self, slice_label: str, prompt: int, part: int = 0, chunk: int | None = None) -> float:
        for v in self.values:
            if (v.slice, v.prompt, v.part, v.chunk) == (slice_label, prompt, part, chunk):
                return v.gate
        raise KeyError((slice_label, prompt, part, chunk))

    def as_dict(self) -> dict:
        return {
            "prompts": [{"prompt": p, "parts": [{"label": q.label, "text": q.text, "chunks": n}
                                                for q, n in zip(parts, counts)]}
                        for p, parts, counts in zip(self.prompts, self.parts, self.chunks)],
            "gates": [asdict(v) for v in self.values],
            "settings": {name: {"ft": g.enabled, "factor": g.factor, "metric": g.metric}
                         for name, g in self.settings.items()},
            "skipped": dict(self.skipped),
        }


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts to report on: strings, at least one, at most :data:`MAX_PROMPTS`."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise SPMValueError("prompts must be a list of strings")
    prompts = list(prompts)
    if not prompts:
        raise SPMValueError("type at least one prompt")
    if len(prompts) > MAX_PROMPTS:
        raise SPMValueError(f"at most {MAX_PROMPTS} prompts at once, not {len(prompts)}")
    long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise SPMValueError(f"prompt {long + 1} has {len(prompts[long])} characters; at most {MAX_PROMPT_CHARS}")
    return prompts


def report(unet: nn.Module, probes: Sequence[Probe], prompts: Sequence[str], rows: PromptRows,
           encoder: ConceptEncoder) -> GateReport:
    """Every probe's gate for every row (and chunk) of every prompt."""
    prompts = check_prompts(prompts)
    parts = [rows.parts(p) for p in prompts]
    encoded = {q.text: _encode(rows, q.text) for ps in parts for q in ps}
    out = GateReport(prompts, parts, [[encoded[q.text][0].shape[1] // rows.chunk for q in ps] for ps in parts])
    for probe in probes:
        session = Session(unet, [(probe.spm, 1.0)], encoder=encoder if probe.gate.enabled else None, gate=probe.gate)
        try:
            session.attach()
        except _DOES_NOT_FIT as e:
            out.skipped[probe.name] = str(e)
            continue
        try:
            out.settings[probe.name] = probe.gate
            out.values += _score(session, probe, parts, encoded, rows.chunk)
        finally:
            session.detach()
    return out


def _encode(rows: PromptRows, text: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    with torch.no_grad():
        cond = rows.conditioning(text)
    if cond.dim() != 3 or cond.shape[0] != 1 or cond.shape[1] % rows.chunk:
        raise SPMShapeError(f"the host encoded a row as {tuple(cond.shape)}; want [1, {rows.chunk} * k, D]")
    return cond, tuple(rows.row_tokens(text))


def _score(session: Session, probe: Probe, parts: list[list[Part]], encoded: dict, L: int) -> list[GateValue]:
    labels = session.slice_labels
    per = L - 2  # prompt tokens per chunk: the runtime locates tokens by this count
    out = []
    for i, ps in enumerate(parts):
        for j, q in enumerate(ps):
            cond, tokens = encoded[q.text]
            k = cond.shape[1] // L
            pieces = [(None, cond, tokens)]
            if k > 1:
                pieces += [(c, cond[:, c * L : (c + 1) * L], tokens[c * per : (c + 1) * per]) for c in range(k)]
            for chunk, c, t in pieces:
                g = session.gates(c, [t])[0].float().cpu()
                out += [GateValue(i, j, chunk, probe.name, label, probe.enforced, float(x))
                        for label, x in zip(labels, g)]
    return out
