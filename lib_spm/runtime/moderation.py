"""Moderation: what an operator enforces, and which user choices it refuses. Host-agnostic.

An operator names SPMs that apply to every generation. The promise is "this concept will not
appear", so user input may add SPMs but never take an enforced one's effect away:

- a negative strength is refused while anything is enforced, whatever the file is called
  (a copy of an enforced SPM under another name at -1 cancels it exactly);
- a user SPM whose weight change points against an enforced one's is refused
  (:func:`opposition`: a file trained or merged to undo the enforced SPM);
- with ``lockdown`` no user SPM is accepted at all, since an SPM that adds the concept back
  need not resemble the enforced one; hosts also turn off everything that writes SPMs then.

What this cannot stop is listed in the README (other LoRA loaders, other extensions,
fine-tuned checkpoints, learned embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch.nn as nn

from ..errors import SPMError, SPMValueError
from ..format.names import layer_names, resolve
from ..format.spm_file import LayerWeights, SPMFile
from ..values import parse_name_weights

# A user SPM that undoes more than this share of an enforced SPM's weight change is refused.
# Unrelated SPMs are near-orthogonal in weight space (|opposition| ~ 1e-3 for random rank-1
# files of SD1.5's size); an SPM built to cancel one sits near 1.
MAX_OPPOSITION = 0.1
MAX_ENFORCED_STRENGTH = 10.0


@dataclass(frozen=True)
class Enforced:
    name: str
    strength: float


@dataclass(frozen=True)
class Policy:
    """The operator's settings. ``error``: the settings could not be read, so every generation
    is refused (an unreadable ``--spm-enforce`` must not mean "nothing enforced")."""

    enforced: tuple[Enforced, ...] = ()
    lockdown: bool = False
    error: str | None = None

    @property
    def enforcing(self) -> bool:
        """SPMs must act on every generation (or none may run, when the settings are unreadable)."""
        return bool(self.enforced) or self.error is not None

    @classmethod
    def parse(cls, enforce: str | None, *, lockdown: bool = False) -> "Policy":
        """``"name:strength,other"`` (strength defaults to 1). Never raises: a bad spec gives a
        policy whose ``error`` refuses every generation."""
        try:
            return cls(parse_enforced(enforce), bool(lockdown))
        except SPMError as e:
            return cls((), bool(lockdown), f"--spm-enforce {enforce!r} cannot be read: {e}")

    def check_user_strength(self, name: str, strength: float) -> None:
        """Refuse a user choice this policy does not allow (names are checked by the caller)."""
        if self.lockdown:
            raise SPMValueError(f"SPM {name!r}: the operator has turned off user SPMs on this server")
        if self.enforcing and strength < 0:
            raise SPMValueError(f"SPM {name!r} at strength {strength:g}: negative strengths are refused while the "
                                "operator enforces SPMs (they could undo an enforced SPM)")

    def describe(self) -> str:
        if self.error:
            return self.error
        parts = [f"{e.name}:{e.strength:g}" for e in self.enforced]
        return ", ".join(parts) + (" (user SPMs off)" if self.lockdown else "")


def parse_enforced(text: str | None) -> tuple[Enforced, ...]:
    if text is None or not str(text).strip():
        return ()
    out = tuple(Enforced(n, w) for n, w in parse_name_weights(str(text), what="enforced strength",
                                                                      lo=0.0, hi=MAX_ENFORCED_STRENGTH))
    if len({e.name for e in out}) != len(out):
        raise SPMValueError("an SPM is named twice")
    return out



# -- weight-space opposition ------------------------------------------------------------------------

def delta_inner(a: LayerWeights, b: LayerWeights) -> float:
    """``<delta_a, delta_b>`` (Frobenius) without forming either delta:
    ``sum((Ua^T Ub) * (Da Db^T))`` times both alpha/rank scales; convolutions flatten their kernels."""
    ua = a.up.float().reshape(a.up.shape[0], a.rank)
    ub = b.up.float().reshape(b.up.shape[0], b.rank)
    da = a.down.float().reshape(a.rank, -1)
    db = b.down.float().reshape(b.rank, -1)
    if ua.shape[0] != ub.shape[0] or da.shape[1] != db.shape[1]:
        return 0.0  # shapes that cannot share a layer; the session's own checks refuse them
    return a.scale * b.scale * float(((ua.T @ ub) * (da @ db.T)).sum())


def opposition(unet: nn.Module, spm: SPMFile, against: SPMFile) -> float:
    """How much of ``against``'s weight change ``spm`` undoes, both at strength 1:
    ``-<d_spm, d_against> / |d_against|^2`` summed over the layers of ``unet`` both adapt
    (any key dialect). 1.0: an exact negation; ~0: unrelated; negative: it adds to it."""
    names = layer_names(unet)
    try:
        mine = {path: spm.layers[k] for k, path in resolve(list(spm.layers), unet, names).items()}
        theirs = {path: against.layers[k] for k, path in resolve(list(against.layers), unet, names).items()}
    except SPMError:
        return 0.0  # does not fit this UNet at all: attaching it fails with the real message
    norm = sum(delta_inner(w, w) for w in theirs.values())
    if norm <= 0.0:
        return 0.0
    cross = sum(delta_inner(mine[p], w) for p, w in theirs.items() if p in mine)
    return -cross / norm


def opposed(unet: nn.Module, user: Iterable[tuple[str, float, SPMFile]],
            enforced: Iterable[tuple[str, float, SPMFile]]) -> str | None:
    """The message refusing the first user SPM that undoes more than :data:`MAX_OPPOSITION` of an
    enforced SPM at the strengths given, or None."""
    enforced = list(enforced)
    for name, strength, spm in user:
        for e_name, e_strength, e_spm in enforced:
            if e_strength <= 0:
                continue
            share = opposition(unet, spm, e_spm) * strength / e_strength
            if share > MAX_OPPOSITION:
                return (f"SPM {name!r} at strength {strength:g} undoes {share:.0%} of the enforced SPM {e_name!r}; "
                        "SPMs that work against an enforced one are refused")
    return None
