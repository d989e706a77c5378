"""What the user asks for, read from the accordion's (or the API's) arguments, ``<spm:...>``
prompt tags and pasted infotext; and the infotext keys the controller writes.

Each reader checks every value (:mod:`lib_spm.values`) and raises an
:class:`~lib_spm.errors.SPMValueError` naming what was wrong, except pasting, which never fails on
our account.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ...errors import SPMError, SPMValueError
from ...format.spm_file import MAX_STRENGTH
from ...runtime import functional
from ...runtime.gating import GateSettings
from ...values import flag, number, parse_name_weights

SLOTS = 4  # SPM choices in the accordion; the API's args follow the same layout
HEAD = ("enabled", "ft", "factor", "metric")  # then (name, strength) per slot
MAX_FACTOR = 10.0

INFO_SPM, INFO_HASHES, INFO_FT = "SPM", "SPM hashes", "SPM FT"
INFO_ENFORCED, INFO_SKIPPED, INFO_UNGATED = "SPM enforced", "SPM skipped", "SPM ungated"
INFO_KEYS = (INFO_SPM, INFO_HASHES, INFO_FT, INFO_ENFORCED, INFO_SKIPPED, INFO_UNGATED)


@dataclass(frozen=True)
class Choice:
    name: str
    strength: float
    source: str = "ui"  # ui | prompt | xyz


@dataclass(frozen=True)
class ApplyArgs:
    """What the user chose in the accordion (or sent as ``alwayson_scripts`` args)."""

    enabled: bool = False
    ft: bool = True
    factor: float = 1.0
    metric: str = GateSettings.metric
    choices: tuple[Choice, ...] = ()

    @classmethod
    def parse(cls, args: Sequence) -> "ApplyArgs":
        """``[enabled, ft, factor, metric, name1, strength1, ...]``; trailing items may be left out."""
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise SPMValueError("SPM script args must be a list: [enabled, ft, factor, metric, name, strength, ...]")
        args = list(args)
        if len(args) > len(HEAD) + 2 * SLOTS:
            raise SPMValueError(f"SPM script takes at most {len(HEAD) + 2 * SLOTS} args "
                                  f"({', '.join(HEAD)}, then name and strength for {SLOTS} SPMs), got {len(args)}")
        d = cls()
        head = dict(zip(HEAD, args))
        enabled = flag(head.get("enabled", d.enabled), "enabled")
        ft = flag(head.get("ft", d.ft), "ft (Facilitated Transport)")
        factor = number(head.get("factor", d.factor), "FT factor", 0.0, MAX_FACTOR)
        metric = head.get("metric", d.metric)
        if not isinstance(metric, str) or metric not in functional.METRICS:
            raise SPMValueError(f"unknown FT metric {metric!r}; choose one of {', '.join(functional.METRICS)}")
        choices = []
        rest = args[len(HEAD):]
        for i in range(0, len(rest), 2):
            name = rest[i]
            strength = rest[i + 1] if i + 1 < len(rest) else 1.0
            if name is None or (isinstance(name, str) and name.strip() in ("", "None")):
                continue
            if not isinstance(name, str):
                raise SPMValueError(f"SPM {i // 2 + 1}: name must be a string, not {type(name).__name__}")
            choices.append(Choice(name.strip(), number(strength, f"strength of SPM {name!r}",
                                                       -MAX_STRENGTH, MAX_STRENGTH)))
        return cls(enabled, ft, factor, metric, tuple(choices))

    def gate(self) -> GateSettings:
        return GateSettings(enabled=self.ft, factor=self.factor, metric=self.metric)

    @classmethod
    def from_infotext(cls, params: dict) -> "ApplyArgs | None":
        """The accordion settings a pasted infotext describes; None when it has none.

        SPMs the pasted prompt holds as ``<spm:...>`` tags come back with the prompt, so they are
        left out; ``SPM enforced`` is the operator's and never pasted. Unreadable entries give
        None rather than an error: pasting never fails on our account.
        """
        text = params.get(INFO_SPM)
        if not isinstance(text, str) or not text.strip():
            return None
        tagged = {m.group(1).split(":")[0].strip() for m in _TAG.finditer(str(params.get("Prompt", "")))}
        try:
            choices = tuple(Choice(n, s) for n, s in parse_name_weights(text, what="strength", lo=-MAX_STRENGTH,
                                                                        hi=MAX_STRENGTH) if n not in tagged)[:SLOTS]
            if not choices:
                return None
            ft_text = str(params.get(INFO_FT, "")).strip()
            if not ft_text or ft_text == "off":
                return cls(True, ft_text != "off", choices=choices)
            metric, _, factor = ft_text.rpartition(" x")
            if metric not in functional.METRICS:
                return cls(True, True, choices=choices)
            return cls(True, True, number(factor, "FT factor", 0.0, MAX_FACTOR), metric, choices)
        except SPMError:
            return None

    def as_args(self) -> list:
        """Back to the script's positional args (what the UI components hold)."""
        out: list = [self.enabled, self.ft, self.factor, self.metric]
        for i in range(SLOTS):
            c = self.choices[i] if i < len(self.choices) else None
            out += [c.name if c else "None", c.strength if c else 1.0]
        return out


_TAG = re.compile(r"<spm:([^>]+)>")


def tag_choices(params_list, default_strength: float = 1.0) -> tuple[Choice, ...]:
    """``<spm:name>`` / ``<spm:name:strength>`` from the WebUI's ``ExtraNetworkParams`` list."""
    out = []
    for params in params_list:
        pos = list(getattr(params, "positional", params))
        if not pos or not str(pos[0]).strip():
            raise SPMValueError("a <spm:...> tag needs a name: <spm:name:strength>")
        name = str(pos[0]).strip()
        if len(pos) > 2:
            raise SPMValueError(f"<spm:{':'.join(map(str, pos))}> has {len(pos)} parts; write <spm:name:strength>")
        strength = number(str(pos[1]).strip(), f"strength in <spm:{name}:...>", -MAX_STRENGTH, MAX_STRENGTH) \
            if len(pos) > 1 else float(default_strength)
        out.append(Choice(name, strength, "prompt"))
    return tuple(out)


def merge_choices(*groups: Sequence[Choice]) -> tuple[Choice, ...]:
    """One entry per SPM name; a later group's entry replaces an earlier one (tags over the accordion)."""
    merged: dict[str, Choice] = {}
    for group in groups:
        for c in group:
            merged.pop(c.name, None)
            merged[c.name] = c
    return tuple(c for c in merged.values() if c.strength != 0.0)
