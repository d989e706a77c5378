"""SPM file metadata: the original zoo keys, the kohya ``ss_*`` keys the WebUI reads, and ours.

Original files carry only ``{"prompts": "a,b", "rank": "1", "alpha": "1.0"}``. We keep those
(so the original code can still read our files) and add ``spm_*`` keys, with the target
concepts as a JSON list because a concept may contain commas.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from ..errors import SPMFormatError, SPMValueError
from . import strict_json

FORMAT_VERSION = 1

ARCHES = ("sd1", "sd2", "sdxl")

# What kohya trainers write; the WebUI's Lora labels a file SDXL only from ss_base_model_version
# and SD2 only from ss_v2 (extensions-builtin/Lora/network.py, detect_version).
_SS_BASE = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}

_OURS = ("spm_format", "spm_targets", "spm_surrogates", "spm_arch", "spm_recipe",
         "spm_description", "spm_name", "spm_slices")
_ORIGINAL = ("prompts", "rank", "alpha")
_SS = ("ss_base_model_version", "ss_v2", "ss_network_dim", "ss_network_alpha",
       "ss_output_name", "ss_network_module")


@dataclass(frozen=True)
class Slice:
    """A contiguous block of rank columns with its own gate (one concept group of a pack)."""

    name: str
    concepts: tuple[str, ...]
    rank: int


@dataclass
class SPMMetadata:
    targets: list[str]
    surrogates: dict[str, str] = field(default_factory=dict)  # concept -> surrogate ("" = neutral)
    arch: str | None = None
    rank: int | None = None
    alpha: float | None = None
    name: str | None = None
    description: str = ""
    recipe: dict = field(default_factory=dict)
    slices: list[Slice] | None = None  # None: one slice, all targets, the whole rank
    format: str = "spm"  # "spm" (ours) or "zoo" (the original trainer's three keys)
    extra: dict[str, str] = field(default_factory=dict)  # keys we do not own, kept verbatim

    # -- reading -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, md: dict[str, str], where: str = "file") -> "SPMMetadata":
        def js(key, kind):
            value = strict_json.loads(md[key], f"{where}: metadata {key}")
            if not isinstance(value, kind):
                raise SPMFormatError(f"{where}: metadata {key} must be a JSON {kind.__name__}")
            return value

        if "spm_format" in md:
            fmt = "spm"
            if not re.fullmatch(r"[0-9]{1,6}", md["spm_format"]):
                raise SPMFormatError(
                    f"{where}: spm_format {strict_json.show(md['spm_format'])} is not a version number")
            version = int(md["spm_format"])
            if version > FORMAT_VERSION:
                raise SPMFormatError(f"{where}: made by a newer sd-webui-spm (format {version}); please update")
        else:
            fmt = "zoo"
        if "spm_targets" in md:
            targets = js("spm_targets", list)
            if not all(isinstance(t, str) for t in targets):
                raise SPMFormatError(f"{where}: spm_targets must be a list of strings")
        else:
            targets = [p.strip() for p in md.get("prompts", "").split(",")]
        targets = [t for t in targets if t.strip()]
        surrogates = js("spm_surrogates", dict) if "spm_surrogates" in md else {}
        if not all(isinstance(v, str) for v in surrogates.values()):
            raise SPMFormatError(f"{where}: spm_surrogates must map concepts to strings")
        arch = md.get("spm_arch") or _arch_from_ss(md)
        if arch is not None and arch not in ARCHES:
            raise SPMFormatError(
                f"{where}: unknown architecture {strict_json.show(arch)} (expected one of {ARCHES})")
        rank = _num(md, "rank", int, where) if "rank" in md else _num(md, "ss_network_dim", int, where)
        alpha = _num(md, "alpha", float, where) if "alpha" in md else _num(md, "ss_network_alpha", float, where)
        slices = _slices(js("spm_slices", list), where) if "spm_slices" in md else None
        return cls(
            targets=targets,
            surrogates=dict(surrogates),
            arch=arch,
            rank=rank,
            alpha=alpha,
            name=md.get("spm_name") or md.get("ss_output_name"),
            description=md.get("spm_description", ""),
            recipe=js("spm_recipe", dict) if "spm_recipe" in md else {},
            slices=slices,
            format=fmt,
            extra={k: v for k, v in md.items() if k not in _OURS + _ORIGINAL + _SS},
        )

    # -- writing -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, str]:
        md = dict(self.extra)
        md["prompts"] = ",".join(self.targets)
        if self.rank is not None:
            md["rank"] = md["ss_network_dim"] = str(self.rank)
        if self.alpha is not None:
            md["alpha"] = md["ss_network_alpha"] = repr(float(self.alpha))
        md["spm_format"] = str(FORMAT_VERSION)
        md["spm_targets"] = json.dumps(self.targets, ensure_ascii=False)
        if self.surrogates:
            md["spm_surrogates"] = json.dumps(self.surrogates, ensure_ascii=False)
        if self.arch is not None:
            md["spm_arch"] = self.arch
            md["ss_base_model_version"] = _SS_BASE[self.arch]
            md["ss_v2"] = str(self.arch == "sd2")
        if self.name:
            md["spm_name"] = md["ss_output_name"] = self.name
        if self.description:
            md["spm_description"] = self.description
        if self.recipe:
            try:  # strict JSON, as the reader demands: a NaN here would make a file nothing loads
                md["spm_recipe"] = json.dumps(self.recipe, ensure_ascii=False, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise SPMValueError(f"the recipe cannot be stored as JSON: {e}") from None
        if self.slices is not None:
            md["spm_slices"] = json.dumps(
                [{"name": s.name, "concepts": list(s.concepts), "rank": s.rank} for s in self.slices],
                ensure_ascii=False,
            )
        md["ss_network_module"] = "networks.lora"
        return md

    @property
    def ungated(self) -> bool:
        """True when some part of the SPM has no target concepts: it then acts on every prompt."""
        if self.slices is None:
            return not self.targets
        return any(not s.concepts for s in self.slices)

    def gate_slices(self, total_rank: int, default_name: str) -> list[Slice]:
        """The slices the runtime gates separately; a plain SPM is one slice over its whole rank."""
        if self.slices is None:
            return [Slice(self.name or default_name, tuple(self.targets), total_rank)]
        return list(self.slices)


def _arch_from_ss(md: dict[str, str]) -> str | None:
    base = md.get("ss_base_model_version", "")
    if base.startswith("sdxl_"):
        return "sdxl"
    if md.get("ss_v2") == "True" or base.startswith("sd_v2"):
        return "sd2"
    if base.startswith("sd_v1"):
        return "sd1"
    return None


def _slices(entries: list, where: str) -> list[Slice]:
    """Strictly typed: a string is not a list of concepts, 1.9 or true is not a rank."""
    out, names = [], set()
    for s in entries:
        shown = strict_json.show(json.dumps(s, ensure_ascii=False))
        if not isinstance(s, dict) or set(s) != {"name", "concepts", "rank"}:
            raise SPMFormatError(f"{where}: spm_slices entry {shown} must have exactly a name, concepts and a rank")
        name, concepts, rank = s["name"], s["concepts"], s["rank"]
        if not isinstance(name, str) or not name.strip():
            raise SPMFormatError(f"{where}: spm_slices entry {shown} has no name")
        if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
            raise SPMFormatError(f"{where}: spm_slices entry {shown}: concepts must be a list of strings")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise SPMFormatError(f"{where}: spm_slices entry {shown}: rank must be a positive whole number")
        if name in names:
            raise SPMFormatError(f"{where}: spm_slices has two slices named {strict_json.show(name)}")
        names.add(name)
        out.append(Slice(name, tuple(concepts), rank))
    return out


# A plain decimal number, as every writer puts it ("1", "4.0", "1e-3"); no inf/nan, no 4,300 digits.
_NUMBER = re.compile(r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,3})?")


def _num(md, key, kind, where):
    if key not in md:
        return None
    text = md[key].strip()
    shown = strict_json.show(md[key])
    value = float(text) if _NUMBER.fullmatch(text) else math.nan
    if math.isnan(value):
        raise SPMFormatError(f"{where}: metadata {key}={shown} is not a number")
    if not math.isfinite(value) or value <= 0:
        raise SPMFormatError(f"{where}: metadata {key}={shown} must be a positive finite number")
    if kind is int:
        if value != int(value):
            raise SPMFormatError(f"{where}: metadata {key}={shown} is not a whole number")
        return int(value)
    return value
