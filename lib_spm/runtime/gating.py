"""Facilitated Transport: how much each slice of the applied SPMs acts on each batch row.

:class:`GateSettings` is what a user chooses; a :class:`ConceptGate` holds the slices' target
concepts, encoded and calibrated by the host's :class:`ConceptEncoder`, and scores rows against
them. The arithmetic is in :mod:`.functional`; nothing here knows a UNet or hooks anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from ..errors import SPMRuntimeError, SPMShapeError, SPMValueError
from . import functional

RowTokens = Sequence["tuple[int, ...] | None"]  # a row's prompt tokens in order, specials excluded


class ConceptEncoder(Protocol):
    """What a host provides so the runtime can score rows against target concepts."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``[n, L, D]``: each text encoded exactly as the UNet receives a prompt's conditioning."""

    def tokens(self, texts: list[str]) -> list[tuple[int, ...]]:
        """Token ids of each text in order, special tokens (start, end, padding) excluded."""


# Concepts of other slices at least this similar (centred end-state cosine) are near-synonyms:
# they do not raise each other's floor, so a word between them opens both gates.
CONTRAST_CAP = 0.5

# Unrelated prompts the calibrated metrics measure each concept against: the concept's mean
# similarity to these is what "unrelated" means for it (its gate is 0 there).
REFERENCE_PROMPTS = (
    "a photo", "a picture of something", "an object", "a landscape with trees", "a city street at night",
    "a portrait of a person", "a bowl of food on a table", "an animal in a field", "a room with furniture",
    "an abstract pattern", "a drawing", "a close-up", "a view of the sky", "a building", "a vehicle on a road",
)


@dataclass(frozen=True)
class GateSettings:
    enabled: bool = True
    factor: float = 1.0
    # calibrated by default: in the shapes world it kept preservation at 1.0 where the published
    # "clipcos_tokenuni" (still available) let the SPM act on unrelated prompts (BENCHMARKS.md)
    metric: str = "pooled_tokenuni"
    reference_prompts: tuple[str, ...] = REFERENCE_PROMPTS  # for the calibrated metrics only
    # calibrated metrics: a concept's floor is also its similarity to the other slices' concepts
    # (below CONTRAST_CAP), so a prompt naming another applied concept does not open it
    # (packs of five in the shapes world: BENCHMARKS.md, "Robustness")
    contrast: bool = True

    def __post_init__(self):
        if self.metric not in functional.METRICS:
            raise SPMValueError(f"unknown gate metric {self.metric!r}; choose one of {functional.METRICS}")
        if not (0.0 <= self.factor < float("inf")):
            raise SPMValueError(f"facilitate factor {self.factor} must be a non-negative number")


@dataclass(frozen=True)
class _Encoded:
    """The concepts as the UNet sees them, for one encoder state."""

    embeds: torch.Tensor  # [C, L, D]
    tokens: tuple[tuple[int, ...], ...]
    calibration: tuple[torch.Tensor, torch.Tensor] | None  # empty prompt's encoding, floor per concept


class ConceptGate:
    """The gate of every slice for every row: its settings, the slices' concepts and, once
    :meth:`prepare` has run, their encodings and calibration. Before that (and when gating is
    off, or no slice names a concept) every gate is 1."""

    def __init__(self, settings: GateSettings, slice_concepts: Sequence[Sequence[str]],
                 encoder: ConceptEncoder | None = None):
        if settings.enabled and encoder is None:
            raise SPMValueError("Facilitated Transport needs a concept encoder; pass encoder= or disable gating")
        self.settings = settings
        self._encoder = encoder
        self.concepts = tuple(sorted({c for cs in slice_concepts for c in cs}))
        index = {c: i for i, c in enumerate(self.concepts)}
        self._groups = [[index[c] for c in cs] for cs in slice_concepts]
        self._encoded: _Encoded | None = None

    @property
    def slices(self) -> int:
        return len(self._groups)

    @property
    def calibration(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The empty prompt's encoding and each concept's floor (calibrated metrics, once prepared)."""
        return self._encoded.calibration if self._encoded else None

    def prepare(self) -> None:
        """Encode the concepts (and calibrate them) with the encoder's current model. Run again
        when that may have changed: the state is replaced only once everything is computed."""
        if not self.settings.enabled or not self.concepts:
            return
        concepts = list(self.concepts)
        embeds = self._encoder.encode(concepts)
        if embeds.dim() != 3 or embeds.shape[0] != len(concepts):
            raise SPMShapeError(f"concept encoder returned {tuple(embeds.shape)} for {len(concepts)} concepts")
        embeds = embeds.detach()
        tokens = tuple(tuple(t) for t in self._encoder.tokens(concepts))
        calibration = self._calibrate(embeds, tokens) if self.settings.metric in functional.CALIBRATED else None
        self._encoded = _Encoded(embeds, tokens, calibration)

    def _calibrate(self, embeds: torch.Tensor, tokens: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's encoding, and each concept's score against unrelated prompts."""
        null = self._encoder.encode([""]).detach()
        refs = list(self.settings.reference_prompts)
        floor = torch.zeros(len(self.concepts))
        if refs:
            ref_embeds, ref_tokens = self._encoder.encode(refs).detach(), self._encoder.tokens(refs)
            raw = functional.pooled_cosine(ref_embeds, [len(t) for t in ref_tokens], embeds,
                                           [len(t) for t in tokens], null)
            # a reference that shares a word with the concept is not unrelated to it; the floor is
            # the mean over the rest (the max let one odd reference shut the gate on synonyms, measured)
            keep = (functional.token_overlap(ref_tokens, tokens) == 0).float()
            floor = (raw * keep).sum(0) / keep.sum(0).clamp_min(1)
        if self.settings.contrast:
            floor = torch.maximum(floor, self._contrast_floor(embeds, tokens, null))
        return null, floor.clamp(min=0.0)

    def _contrast_floor(self, embeds: torch.Tensor, tokens: tuple, null: torch.Tensor) -> torch.Tensor:
        """Each concept's highest similarity to a concept it shares no slice with (below the cap).

        A prompt naming another erased concept is then not this one: in a pack of shapes and colours
        the colour gates otherwise half-open on every coloured prompt. Concepts of one slice (the
        names one SPM is gated by) never raise each other's floor."""
        C = len(self.concepts)
        lengths = [len(t) for t in tokens]
        raw = functional.pooled_cosine(embeds, lengths, embeds, lengths, null)  # [C, C]
        related = torch.zeros(C, C, dtype=torch.bool)
        for group in self._groups:
            idx = torch.tensor(group, dtype=torch.long)
            if len(idx):
                related[idx[:, None], idx[None, :]] = True
        related |= torch.eye(C, dtype=torch.bool)
        others = raw.masked_fill(related | (raw >= CONTRAST_CAP), float("-inf"))
        return others.amax(dim=1).clamp(min=0.0)  # -inf (no other concept) -> 0

    def gates(self, cond: torch.Tensor, rows: RowTokens | None = None) -> torch.Tensor:
        """``[B, slices]``: the gate of every slice for every row of a conditioning batch."""
        B = cond.shape[0]
        enc = self._encoded
        if not self.settings.enabled or enc is None:
            return torch.ones(B, self.slices, device=cond.device)
        if rows is not None and len(rows) != B:
            raise SPMRuntimeError(f"host gave prompts for {len(rows)} rows, the UNet call has {B}")
        with torch.no_grad():
            scores = functional.concept_scores(
                self.settings.metric, cond.detach(), enc.embeds.to(cond.device),
                rows if rows is not None else [None] * B, enc.tokens, enc.calibration,
            )
        return functional.slice_gates(scores, self._groups, self.settings.factor)
