"""Applying SPMs during WebUI generation: the script's arguments, prompt tags, infotext, and the
one object that owns what is attached to the loaded model.

The WebUI script (``scripts/spm.py``) only forwards its hooks here. Per generation::

    before_process          controller.begin(p, ApplyArgs.parse(args))    (API args validated here)
    extra network activate  controller.set_tags(p, tag_choices(params))   (``<spm:name:strength>``)
    before every sampling   controller.before_sampling(p)                 (first pass, hires pass)
    on_cfg_denoiser         controller.on_cfg_denoiser(params)            (row texts of the step)
    post_sample             controller.after_sampling(p)
    postprocess / p.close   controller.end(p)

Sessions are (re)built when the model or the set of SPMs changes (checkpoint change between
batches, other tags in the hires prompt) and detached after every sampling; ``end`` runs from
``postprocess`` and, for generations that fail, from the processing object's ``close`` (the
WebUI closes every processing object in a ``finally``, UI and API alike). Nothing stays attached.

Operator-enforced SPMs (``--spm-enforce``) get a session of their own with the operator's gate
settings, so no user argument can weaken them; if none of them fits the loaded model, generation
is refused (fail closed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from .. import archs, functional
from ..errors import SPMError, SPMValueError
from ..library import SPMLibrary
from ..session import GateSettings, Session
from ..spm_file import SPMFile
from .webui import PromptTokens, WebUIConcepts, WebUIRows, flagged_arch, unet_of

log = logging.getLogger("sd-webui-spm")

SLOTS = 4  # SPM choices in the accordion; the API's args follow the same layout
HEAD = ("enabled", "ft", "factor", "metric")  # then (name, strength) per slot
MAX_STRENGTH = 10.0
MAX_FACTOR = 10.0

INFO_SPM, INFO_HASHES, INFO_FT = "SPM", "SPM hashes", "SPM FT"


@dataclass(frozen=True)
class Choice:
    name: str
    strength: float
    source: str = "ui"  # ui | prompt | xyz | enforced


def _number(value, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SPMValueError(f"{what} must be a number, not {type(value).__name__}")
    try:
        x = float(value)
    except ValueError:
        raise SPMValueError(f"{what} must be a number, not {value!r}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise SPMValueError(f"{what} must be between {lo:g} and {hi:g}, not {value!r}")
    return x


def _flag(value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "on", "off", "1", "0"):
        return value.strip().lower() in ("true", "on", "1")
    raise SPMValueError(f"{what} must be true or false, not {value!r}")


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
        enabled = _flag(head.get("enabled", d.enabled), "enabled")
        ft = _flag(head.get("ft", d.ft), "ft (Facilitated Transport)")
        factor = _number(head.get("factor", d.factor), "FT factor", 0.0, MAX_FACTOR)
        metric = head.get("metric", d.metric)
        if metric not in functional.METRICS:
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
            choices.append(Choice(name.strip(), _number(strength, f"strength of SPM {name!r}", -MAX_STRENGTH,
                                                        MAX_STRENGTH)))
        return cls(enabled, ft, factor, metric, tuple(choices))

    def gate(self) -> GateSettings:
        return GateSettings(enabled=self.ft, factor=self.factor, metric=self.metric)

    # -- infotext ----------------------------------------------------------------------------
    def infotext(self, hashes: dict[str, str]) -> dict[str, str]:
        """Generation parameters for the UI-chosen SPMs (prompt tags are in the prompt already)."""
        if not self.enabled or not self.choices:
            return {}
        out = {INFO_SPM: ", ".join(f"{c.name}:{c.strength:g}" for c in self.choices)}
        known = [f"{c.name}: {hashes[c.name]}" for c in self.choices if c.name in hashes]
        if known:
            out[INFO_HASHES] = ", ".join(known)
        out[INFO_FT] = f"{self.metric} x{self.factor:g}" if self.ft else "off"
        return out

    @classmethod
    def from_infotext(cls, params: dict) -> "ApplyArgs | None":
        """The settings a pasted infotext describes; None when it has no SPM entry.

        Unreadable entries give None rather than an error: pasting never fails on our account.
        """
        text = params.get(INFO_SPM)
        if not isinstance(text, str) or not text.strip():
            return None
        try:
            choices = []
            for part in _split_list(text)[:SLOTS]:
                name, sep, strength = part.rpartition(":")
                if not sep:
                    name, strength = part, "1"
                choices.append(Choice(name.strip(), _number(strength.strip(), "strength", -MAX_STRENGTH, MAX_STRENGTH)))
            ft_text = str(params.get(INFO_FT, "")).strip()
            if not ft_text or ft_text == "off":
                return cls(True, ft_text != "off", choices=tuple(choices))
            metric, _, factor = ft_text.rpartition(" x")
            if metric not in functional.METRICS:
                return cls(True, True, choices=tuple(choices))
            return cls(True, True, _number(factor, "FT factor", 0.0, MAX_FACTOR), metric, tuple(choices))
        except SPMValueError:
            return None

    def as_args(self) -> list:
        """Back to the script's positional args (what the UI components hold)."""
        out: list = [self.enabled, self.ft, self.factor, self.metric]
        for i in range(SLOTS):
            c = self.choices[i] if i < len(self.choices) else None
            out += [c.name if c else "None", c.strength if c else 1.0]
        return out


def _split_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def tag_choices(params_list, default_strength: float = 1.0) -> tuple[Choice, ...]:
    """``<spm:name>`` / ``<spm:name:strength>`` from the WebUI's ``ExtraNetworkParams`` list."""
    out = []
    for params in params_list:
        pos = list(getattr(params, "positional", params))
        if not pos or not str(pos[0]).strip():
            raise SPMValueError("a <spm:...> tag needs a name: <spm:name:strength>")
        name = str(pos[0]).strip()
        strength = _number(pos[1], f"strength in <spm:{name}:...>", -MAX_STRENGTH, MAX_STRENGTH) \
            if len(pos) > 1 else float(default_strength)
        out.append(Choice(name, strength, "prompt"))
    return tuple(out)


def parse_enforced(text: str | None) -> tuple[Choice, ...]:
    """The operator's ``--spm-enforce "name:strength,other"``."""
    if not text:
        return ()
    out = []
    for part in _split_list(text):
        name, sep, strength = part.rpartition(":")
        if not sep:
            name, strength = part, "1"
        out.append(Choice(name.strip(), _number(strength, f"enforced strength of {name!r}", 0.0, MAX_STRENGTH),
                          "enforced"))
    return tuple(out)


def merge_choices(*groups: Sequence[Choice]) -> tuple[Choice, ...]:
    """One entry per SPM name; a later group's entry replaces an earlier one (tags over the accordion)."""
    merged: dict[str, Choice] = {}
    for group in groups:
        for c in group:
            merged.pop(c.name, None)
            merged[c.name] = c
    return tuple(c for c in merged.values() if c.strength != 0.0)


def model_arch(sd_model) -> str | None:
    """The loaded model's architecture: its WebUI flags, else its UNet's context width."""
    arch = flagged_arch(sd_model)
    if arch is not None:
        return arch
    dim = archs.unet_context_dim(unet_of(sd_model))
    return archs.arch_from_context_dim(dim) if dim else None


# -- the runtime owner ---------------------------------------------------------------------------

class _CachedConcepts:
    """A ConceptEncoder whose encodings are cached per (CLIP skip, texts) for one model."""

    def __init__(self, inner: WebUIConcepts, clip_skip: Callable[[], object]):
        self._inner, self._clip_skip = inner, clip_skip
        self._cache: dict = {}

    def encode(self, texts):
        key = (self._clip_skip(), tuple(texts))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._inner.encode(list(texts))
        return hit

    def tokens(self, texts):
        return self._inner.tokens(list(texts))


@dataclass
class _Generation:
    p: object
    args: ApplyArgs
    xyz: dict = field(default_factory=dict)
    tags: tuple[Choice, ...] = ()
    key: tuple | None = None
    sessions: list[Session] = field(default_factory=list)
    rows: list[WebUIRows] = field(default_factory=list)  # one per session
    warned: set = field(default_factory=set)
    applied: tuple[Choice, ...] = ()


class SPMController:
    """The one owner of everything the extension attaches to the loaded model.

    ``webui`` gives the WebUI's ``shared`` module (``sd_model``, ``opts``); tests pass a stand-in.
    """

    def __init__(self, library: SPMLibrary, *, enforced: Sequence[Choice] = (), enforced_gate: GateSettings | None = None,
                 shared=None):
        self.library = library
        self.enforced = tuple(enforced)
        self.enforced_gate = enforced_gate or GateSettings()
        self._shared = shared
        self._gen: _Generation | None = None
        self._model_state: tuple | None = None  # (sd_model, PromptTokens, _CachedConcepts)

    # -- WebUI state ---------------------------------------------------------------------------
    @property
    def shared(self):
        if self._shared is None:
            import importlib

            self._shared = importlib.import_module("modules.shared")
        return self._shared

    def _opt(self, name, default):
        return getattr(self.shared.opts, name, default)

    def _for_model(self, sd_model):
        st = self._model_state
        if st is None or st[0] is not sd_model:
            tokens = PromptTokens(sd_model)
            concepts = _CachedConcepts(WebUIConcepts(sd_model, tokens=tokens),
                                       lambda: self._opt("CLIP_stop_at_last_layers", 1))
            st = self._model_state = (sd_model, tokens, concepts)
        return st

    # -- a generation --------------------------------------------------------------------------
    def begin(self, p, args: ApplyArgs) -> None:
        """Start a generation: drop anything a failed one left, remember the user's choices."""
        self._drop()
        xyz = dict(getattr(p, "spm_xyz", None) or {})
        if "model" in xyz:
            first = args.choices[0] if args.choices else Choice(xyz["model"], 1.0)
            args = replace(args, enabled=True, choices=(replace(first, name=xyz["model"], source="xyz"),) + args.choices[1:])
        if "strength" in xyz:
            args = replace(args, choices=tuple(replace(c, strength=float(xyz["strength"])) for c in args.choices))
        if "factor" in xyz:
            args = replace(args, factor=float(xyz["factor"]))
        self._gen = _Generation(p, args, xyz)
        hashes = {}
        if args.enabled:
            for c in args.choices:
                try:
                    hashes[c.name] = self.library.get(c.name).short_hash
                except SPMError:
                    pass
        p.extra_generation_params.update(args.infotext(hashes))
        self._chain_close(p)

    def set_tags(self, p, tags: Sequence[Choice]) -> None:
        if self._gen is not None and self._gen.p is p:
            self._gen.tags = tuple(tags)

    def before_sampling(self, p) -> None:
        g = self._gen
        if g is None or g.p is not p:
            self._drop()
            g = self._gen = _Generation(p, ApplyArgs())
        user = merge_choices(g.args.choices if g.args.enabled else (), g.tags)
        if not user and not self.enforced:
            self._detach(g)
            return
        sd_model = self.shared.sd_model
        key = (id(sd_model), user, g.args.gate())
        if g.key == key:  # the hires pass, the next batch: same model, same SPMs
            for s in g.sessions:
                if not s.attached:
                    s.attach()
            return
        self._detach(g)
        g.sessions, g.rows, g.applied, g.key = [], [], (), None
        try:
            self._build(g, sd_model, user)
        except BaseException:
            self._detach(g)
            raise
        g.key = key

    def on_cfg_denoiser(self, params) -> None:
        if self._gen is not None:
            for rows in self._gen.rows:
                rows.on_cfg_denoiser(params)

    def after_sampling(self, p) -> None:
        if self._gen is not None and self._gen.p is p:
            self._detach(self._gen)

    def end(self, p) -> None:
        if self._gen is not None and self._gen.p is p:
            self._drop()

    def model_changed(self, sd_model=None) -> None:
        """A checkpoint was loaded: nothing may stay on the old model; cached encodings go."""
        self._drop()
        self._model_state = None

    def shutdown(self) -> None:
        self._drop()
        self._model_state = None

    @property
    def attached(self) -> bool:
        return self._gen is not None and any(s.attached for s in self._gen.sessions)

    @property
    def applied(self) -> tuple[Choice, ...]:
        """The SPMs the current generation's sessions hold."""
        return self._gen.applied if self._gen is not None else ()

    # -- internals -----------------------------------------------------------------------------
    def _detach(self, g: _Generation) -> None:
        for s in g.sessions:
            s.detach()
        for rows in g.rows:
            rows.reset()

    def _drop(self) -> None:
        if self._gen is not None:
            self._detach(self._gen)
            self._gen = None

    def _chain_close(self, p) -> None:
        """Run :meth:`end` when the WebUI closes ``p`` (its ``finally``), on error too."""
        close = getattr(p, "close", None)
        if not callable(close) or getattr(close, "_spm_end", False):
            return

        def closing():
            try:
                self.end(p)
            finally:
                close()

        closing._spm_end = True
        p.close = closing

    def _warn(self, g: _Generation, text: str) -> None:
        if text in g.warned:
            return
        g.warned.add(text)
        log.warning(text)
        comment = getattr(g.p, "comment", None)
        if callable(comment):
            comment(text)

    def _load(self, g: _Generation, c: Choice, arch: str | None) -> SPMFile | None:
        try:
            spm = self.library.load(c.name)
        except SPMError as e:
            if c.source == "enforced":
                raise
            self._warn(g, f"SPM {c.name!r} skipped: {e}")
            return None
        if arch is not None and spm.metadata.arch is not None and spm.metadata.arch != arch:
            if c.source != "enforced":
                self._warn(g, f"SPM {c.name!r} skipped: it is for {spm.metadata.arch}, the loaded model is {arch}")
            return None
        return spm

    def _build(self, g: _Generation, sd_model, user: tuple[Choice, ...]) -> None:
        """Attach one session for the enforced SPMs (operator's gate) and one for the user's."""
        arch = model_arch(sd_model)
        unet = unet_of(sd_model)
        _, tokens, concepts = self._for_model(sd_model)
        groups = [(user, g.args.gate(), False)]
        if self.enforced:
            groups.insert(0, (self.enforced, self.enforced_gate, True))
        for choices, gate, enforced in groups:
            spms = [(c, s) for c in choices if (s := self._load(g, c, arch)) is not None]
            if enforced and not spms:
                raise SPMValueError(f"generation refused: none of the enforced SPMs "
                                    f"({', '.join(c.name for c in self.enforced)}) fits the loaded {arch} model")
            if spms:
                # each session walks the step's rows itself, so each has its own row reader
                rows = WebUIRows(tokens, sd_model=sd_model, opts=self.shared.opts)
                self._attach(g, unet, spms, gate, concepts, rows, enforced)

    def _attach(self, g: _Generation, unet, spms, gate: GateSettings, concepts, rows: WebUIRows,
                enforced: bool) -> None:
        """Attach a session with every SPM that fits this UNet; those that do not are named and
        skipped (an enforced one that does not fit refuses the generation)."""

        def attach(items):
            s = Session(unet, [(spm, c.strength) for c, spm in items], encoder=concepts if gate.enabled else None,
                        gate=gate, conditioning_of=rows.conditioning_of, row_tokens=rows).attach()
            g.sessions.append(s)
            g.rows.append(rows)
            g.applied += tuple(c for c, _ in items)

        try:
            return attach(spms)
        except SPMError:
            if enforced:
                raise
        good = []
        for c, spm in spms:
            try:
                with Session(unet, [(spm, c.strength)], gate=GateSettings(enabled=False)):
                    good.append((c, spm))
            except SPMError as e:
                self._warn(g, f"SPM {c.name!r} skipped: {e}")
        if good:
            attach(good)
