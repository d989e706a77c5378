"""Applying SPMs during WebUI generation: the one object that owns what is attached to the loaded
model (what the user asked for is read in :mod:`.args`).

The WebUI runs every Script method and callback inside ``try/except`` and only reports what
they raise, so nothing raised there can stop a generation. What must stop one (bad arguments,
an enforced SPM that cannot act) is therefore decided in those hooks and carried out by a
*guard*: a forward pre-hook on the UNet, whose exceptions end sampling, fail the API request
with the message (``SPMRefusal.status_code``) and show it in the UI. Per generation::

    before_process          controller.begin(p, args)            args checked; never raises
    extra network activate  controller.set_tags(p, params)       ``<spm:name:strength>``
    before every sampling   controller.before_sampling(p)        sessions built (first, hires pass)
    on_cfg_denoiser         controller.on_cfg_denoiser(params)   row texts of the step
    UNet call               guard                                raises the refusal, if any
    post_sample             controller.after_sampling(p)
    postprocess             controller.end(p)

A generation that fails ends at the next ``before_process`` (or model change): the WebUI offers
no hook on failure, and replacing ``p.close`` would be the method replacement we do not do. A
refusal ends its generation itself, in the guard, just before it raises.

With ``--spm-enforce`` the guard also refuses every UNet call that the enforced SPMs are not
attached to, and every call in which they did not act (a probe on one of their layers): a
refiner or a model loaded mid-generation, a UNet another extension replaced, a hook of ours that
failed. The enforced SPMs get a session of their own with the operator's gate settings.

Infotext says what acted, nothing else: ``SPM`` (the user's SPMs, tags included, at their
effective strengths), ``SPM enforced``, ``SPM hashes`` (of the files applied), ``SPM FT``, and
``SPM skipped`` (what was chosen but did not act, and why; the UI also shows it under the image).
Paste-back restores the accordion from ``SPM`` minus the SPMs the pasted prompt holds as tags;
``SPM enforced`` is never pasted into user fields.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from ...errors import (
    ArchitectureMismatch,
    ModerationUnavailable,
    SPMError,
    SPMKeyError,
    SPMRefusal,
    SPMRequestError,
    SPMShapeError,
    UnresolvedKeysError,
)
from ...format.names import layer_names
from ...format.spm_file import MAX_STRENGTH, SPMFile
from ...operations.library import SPMLibrary, check_name
from ...runtime.gating import GateSettings
from ...runtime.moderation import Policy, opposed
from ...runtime.placement import placement
from ...runtime.session import Session
from ...values import number
from .args import (
    INFO_ENFORCED,
    INFO_FT,
    INFO_HASHES,
    INFO_KEYS,
    INFO_SKIPPED,
    INFO_SPM,
    INFO_UNGATED,
    MAX_FACTOR,
    ApplyArgs,
    Choice,
    merge_choices,
    tag_choices,
)
from .gateway import Gateway
from .model import is_placeholder, model_arch, unet_of
from .rows import WebUIConcepts, WebUIRows, rows_for, tokens_for

log = logging.getLogger("sd-webui-spm")

PREFIX = "Concept erasure (SPM): "

# what a file that does not suit the loaded UNet raises when attached (skipped, not refused)
_DOES_NOT_FIT = (ArchitectureMismatch, UnresolvedKeysError, SPMShapeError, SPMKeyError)


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
class _Attached:
    session: Session
    rows: WebUIRows
    enforced: bool
    probe: object = None  # hook handle on one of an enforced session's layers


@dataclass
class _Generation:
    p: object
    args: ApplyArgs = field(default_factory=ApplyArgs)
    tags: tuple[Choice, ...] = ()
    refusal: SPMRefusal | None = None
    key: tuple | None = None
    attached: list[_Attached] = field(default_factory=list)
    acted: dict = field(default_factory=dict)  # name -> (strength, short hash): user SPMs that acted
    ungated: set = field(default_factory=set)  # of those, the ones without target concepts
    enforced_acted: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # name -> why

    def refuse(self, refusal: SPMRefusal) -> None:
        if self.refusal is None:  # the first reason is the one to fix first
            self.refusal = refusal


class SPMController:
    """The one owner of everything the extension attaches to the loaded model.

    ``shared`` stands in for the WebUI's ``shared`` module (``sd_model``, ``opts``), as tests do.
    """

    def __init__(self, library: SPMLibrary, *, policy: Policy = Policy(), enforced_gate: GateSettings | None = None,
                 shared=None):
        self.library = library
        self.policy = policy
        self.enforced_gate = enforced_gate or GateSettings()
        self._webui = Gateway(shared=shared)
        self._gen: _Generation | None = None
        self._model_state: tuple | None = None  # (sd_model, PromptTokens, _CachedConcepts)
        self._guards: dict[int, tuple[weakref.ref, list]] = {}  # id(unet) -> (unet, hook handles)
        self._trusted = 0  # > 0 while our own training job runs the UNet
        self._probe_fired = False

    # -- WebUI state ---------------------------------------------------------------------------
    @property
    def shared(self):
        return self._webui.shared

    def _opt(self, name, default):
        return getattr(self.shared.opts, name, default)

    def _for_model(self, sd_model):
        st = self._model_state
        if st is None or st[0] is not sd_model:
            tokens = tokens_for(sd_model)
            concepts = _CachedConcepts(WebUIConcepts(sd_model, tokens=tokens),
                                       lambda: self._opt("CLIP_stop_at_last_layers", 1))
            st = self._model_state = (sd_model, tokens, concepts)
        return st

    # -- a generation --------------------------------------------------------------------------
    def begin(self, p, raw_args) -> None:
        """Start a generation: drop anything a failed one left, check the user's choices.
        Never raises: what is wrong becomes the generation's refusal, carried out by the guard."""
        self._drop()
        g = self._gen = _Generation(p)
        params = getattr(p, "extra_generation_params", None)
        if isinstance(params, dict):
            for k in INFO_KEYS:
                params.pop(k, None)
        if self.policy.error:
            g.refuse(ModerationUnavailable(PREFIX + self.policy.error))
        try:
            args = self._with_xyz(ApplyArgs.parse(raw_args), dict(getattr(p, "spm_xyz", None) or {}))
            if args.enabled:
                self._check_user(args.choices, explicit=True)
            g.args = args
        except SPMError as e:
            g.refuse(_as_request_error(e))
        except Exception as e:  # a bug of ours must not let the request run as if nothing was asked
            log.exception("checking the SPM arguments failed")
            g.refuse(SPMRequestError(f"{PREFIX}checking the arguments failed: {type(e).__name__}: {e}"))
        self._guard_current()

    def set_tags(self, p, params_list, default_strength: float = 1.0) -> None:
        """The ``<spm:...>`` tags of this pass (each call replaces the previous one's)."""
        g = self._gen
        if g is None or g.p is not p:
            self.begin(p, [])
            g = self._gen
        try:
            tags = tag_choices(params_list, default_strength)
            self._check_user(tags, explicit=False)
            g.tags = tags
        except SPMError as e:
            g.refuse(_as_request_error(e))
            self._guard_current()

    def before_sampling(self, p) -> None:
        g = self._gen
        if g is None or g.p is not p:
            self.begin(p, [])  # our before_process did not run for this p: nothing the user chose
            g = self._gen
        sd_model = getattr(self.shared, "sd_model", None)
        self._guard_current()
        if g.refusal is not None:
            self._detach(g)
            return
        user = merge_choices(g.args.choices if g.args.enabled else (), g.tags)
        if not user and not self.policy.enforced:
            self._detach(g)
            return
        key = (id(sd_model), user, g.args.gate())
        try:
            if g.key == key:  # the hires pass, the next batch: same model, same SPMs
                for a in g.attached:
                    if not a.session.attached:
                        a.session.attach()
                        self._arm_probe(a)
                return
            self._detach(g)
            g.attached, g.key = [], None
            self._build(g, sd_model, user)
            g.key = key
        except SPMRefusal as e:
            self._detach(g)
            g.refuse(e)
        except Exception as e:
            self._detach(g)
            log.exception("attaching SPMs failed")
            kind = ModerationUnavailable if self.policy.enforcing else SPMRequestError
            g.refuse(kind(f"{PREFIX}attaching SPMs failed: {type(e).__name__}: {e}"))
        self._guard_current()
        self._write_infotext(g)

    def on_cfg_denoiser(self, params) -> None:
        if self._gen is not None:
            for a in self._gen.attached:
                a.rows.on_cfg_denoiser(params)

    def after_sampling(self, p) -> None:
        if self._gen is not None and self._gen.p is p:
            self._detach(self._gen)

    def end(self, p) -> None:
        if self._gen is not None and self._gen.p is p:
            self._drop()

    def model_changed(self, sd_model=None) -> None:
        """A checkpoint was loaded (between requests, or inside one: an override, the refiner).
        Nothing stays on the old model and cached encodings go; the request's choices stay and
        its sessions are rebuilt for the new model at its next sampling."""
        if self._gen is not None:
            self._detach(self._gen)
            self._gen.key = None
        self._model_state = None
        if self.policy.enforcing:
            self.watch(sd_model)
            self.check_policy(sd_model)

    def shutdown(self) -> None:
        self._drop()
        self._model_state = None
        self._unguard()

    @contextlib.contextmanager
    def trusted(self):
        """Our own training job runs the UNet (the WebUI's queue lock keeps generations out):
        the enforcement guard lets those calls through."""
        self._drop()
        self._trusted += 1
        try:
            yield
        finally:
            self._trusted -= 1

    @property
    def attached(self) -> bool:
        return self._gen is not None and any(a.session.attached for a in self._gen.attached)

    # -- start-up and model checks -------------------------------------------------------------
    def check_policy(self, sd_model=None) -> list[str]:
        """Say loudly, in the log, what of the operator's settings cannot act (at start-up and on
        every model load). Returns the problems found."""
        pol = self.policy
        if not pol.enforcing:
            return []
        problems = [pol.error] if pol.error else []
        arch = None
        if sd_model is not None:
            with contextlib.suppress(Exception):
                arch = model_arch(sd_model)
        fits = 0
        for e in pol.enforced:
            try:
                spm = self.library.load(e.name)
            except SPMError as err:
                problems.append(f"enforced SPM {e.name!r} cannot be used: {err}")
                continue
            if arch is not None and spm.arch is not None and spm.arch != arch:
                log.warning("sd-webui-spm: enforced SPM %r is for %s; the loaded model is %s, so it is skipped there",
                            e.name, spm.arch, arch)
            else:
                fits += 1
        if pol.enforced and arch is not None and not fits:
            problems.append(f"none of the enforced SPMs fits the loaded {arch} model")
        for text in problems:
            log.error("sd-webui-spm: %s: EVERY GENERATION WILL BE REFUSED until this is fixed", text)
        return problems

    # -- the guard -----------------------------------------------------------------------------
    def _guard_current(self) -> None:
        """Guard the loaded model while SPMs are enforced (always) or this generation is refused."""
        if self.policy.enforcing or (self._gen is not None and self._gen.refusal is not None):
            self.watch(getattr(self.shared, "sd_model", None))

    def _unguard(self) -> None:
        for _, handles in self._guards.values():
            for h in handles:
                h.remove()
        self._guards.clear()

    def watch(self, sd_model) -> None:
        """Put the guard on this model's UNet (once per UNet object). Forge's placeholder has
        none: the guard goes on the real model when Forge loads it (``model_changed``)."""
        if sd_model is None or is_placeholder(sd_model):
            return
        try:
            unet = unet_of(sd_model)
        except SPMError as e:
            if self.policy.enforcing:
                log.error("sd-webui-spm: cannot guard this model (%s): generation with it cannot be moderated", e)
            return
        key = id(unet)
        entry = self._guards.get(key)
        if entry is not None and entry[0]() is unet:
            return
        for k in [k for k, (ref, _) in self._guards.items() if ref() is None]:
            del self._guards[k]
        handles = [unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True),
                   unet.register_forward_hook(self._after_unet_call)]
        self._guards[key] = (weakref.ref(unet), handles)

    def _on_unet_call(self, module, args, kwargs):
        g = self._gen
        if g is not None and g.refusal is not None:
            refusal = g.refusal
            self._drop()  # the exception ends the request: nothing of it may outlive it
            raise refusal
        if not self.policy.enforcing or self._trusted:
            return None
        if g is None or not any(a.enforced and a.session.attached and a.session.unet is module for a in g.attached):
            raise ModerationUnavailable(
                f"{PREFIX}the operator's enforced SPMs are not attached to this UNet, so it may not run "
                "(a refiner, a model loaded mid-generation, or a UNet call outside a generation)")
        self._probe_fired = False
        return None

    def _after_unet_call(self, module, args, output):
        if self.policy.enforcing and not self._trusted and not self._probe_fired:
            raise ModerationUnavailable(f"{PREFIX}the enforced SPMs did not act in this UNet call "
                                        "(another extension replaced the UNet's computation?); refused")
        return None

    def _arm_probe(self, a: _Attached) -> None:
        """A hook on the last layer an enforced session adapts: proof, per UNet call, that its
        hooks ran."""
        if not a.enforced:
            return
        if a.probe is not None:
            a.probe.remove()
        module = a.session.unet.get_submodule(a.session.layer_paths[-1])

        def fired(*_):
            self._probe_fired = True

        a.probe = module.register_forward_hook(fired)

    # -- internals -----------------------------------------------------------------------------
    def _with_xyz(self, args: ApplyArgs, xyz: dict) -> ApplyArgs:
        if "model" in xyz:
            first = args.choices[0] if args.choices else Choice(str(xyz["model"]), 1.0)
            args = replace(args, enabled=True,
                           choices=(replace(first, name=str(xyz["model"]), source="xyz"),) + args.choices[1:])
        if "strength" in xyz:
            s = number(xyz["strength"], "[SPM] Strength", -MAX_STRENGTH, MAX_STRENGTH)
            args = replace(args, choices=tuple(replace(c, strength=s) for c in args.choices))
        if "factor" in xyz:
            args = replace(args, factor=number(xyz["factor"], "[SPM] FT factor", 0.0, MAX_FACTOR))
        return args

    def _check_user(self, choices: Sequence[Choice], *, explicit: bool) -> None:
        """Names must be safe and allowed by the policy; an explicitly chosen SPM must load
        (a tag naming no file is only skipped, as the built-in Lora does)."""
        for c in choices:
            check_name(c.name)
            self.policy.check_user_strength(c.name, c.strength)
            if explicit:
                self.library.load(c.name)

    def _detach(self, g: _Generation) -> None:
        for a in g.attached:
            if a.probe is not None:
                a.probe.remove()
                a.probe = None
            a.session.detach()
            a.rows.reset()

    def _drop(self) -> None:
        if self._gen is not None:
            self._detach(self._gen)
            self._gen = None
        if not self.policy.enforcing:
            self._unguard()  # a refused generation's guard goes with it

    def _skip(self, g: _Generation, name: str, why: str) -> None:
        if name not in g.skipped:
            g.skipped[name] = why
            self._note(g, f"SPM {name!r} skipped: {why}")

    @staticmethod
    def _note(g: _Generation, text: str) -> None:
        """A line under the image (the WebUI's comments) and in the log."""
        log.warning(text)
        comment = getattr(g.p, "comment", None)
        if callable(comment):
            comment(text)

    def _write_infotext(self, g: _Generation) -> None:
        params = getattr(g.p, "extra_generation_params", None)
        if not isinstance(params, dict):
            return
        for k in INFO_KEYS:
            params.pop(k, None)
        hashes = {**g.enforced_acted, **g.acted}
        if g.acted:
            params[INFO_SPM] = ", ".join(f"{n}:{s:g}" for n, (s, _) in g.acted.items())
            params[INFO_FT] = f"{g.args.metric} x{g.args.factor:g}" if g.args.ft else "off"
        if g.enforced_acted:
            params[INFO_ENFORCED] = ", ".join(f"{n}:{s:g}" for n, (s, _) in g.enforced_acted.items())
        if hashes:
            params[INFO_HASHES] = ", ".join(f"{n}: {h}" for n, (_, h) in hashes.items())
        if g.ungated & set(g.acted):
            params[INFO_UNGATED] = ", ".join(n for n in g.acted if n in g.ungated)
        skipped = {n: w for n, w in g.skipped.items() if n not in g.acted}
        if skipped:
            params[INFO_SKIPPED] = "; ".join(f"{n}: {w}" for n, w in skipped.items())

    def _load_user(self, g: _Generation, c: Choice, arch: str | None) -> SPMFile | None:
        if c.source == "prompt" and not self.library.exists(c.name):
            self._skip(g, c.name, "no such SPM file")
            return None
        try:
            spm = self.library.load(c.name)
        except SPMError as e:
            if c.source != "prompt":
                raise _as_request_error(e) from None
            self._skip(g, c.name, str(e))
            return None
        if arch is not None and spm.arch is not None and spm.arch != arch:
            self._skip(g, c.name, f"it is for {spm.arch}, the loaded model is {arch}")
            return None
        return spm

    def _load_enforced(self, arch: str | None) -> list[tuple[Choice, SPMFile]]:
        out = []
        for e in self.policy.enforced:
            try:
                spm = self.library.load(e.name)
            except SPMError as err:
                raise ModerationUnavailable(f"{PREFIX}generation refused: the enforced SPM {e.name!r} "
                                            f"cannot be used: {err}") from None
            if arch is not None and spm.arch is not None and spm.arch != arch:
                continue  # for the operator's other models
            out.append((Choice(e.name, e.strength, "enforced"), spm))
        return out

    def _build(self, g: _Generation, sd_model, user: tuple[Choice, ...]) -> None:
        """Attach one session for the enforced SPMs (operator's gate) and one for the user's."""
        arch = model_arch(sd_model)
        unet = unet_of(sd_model)
        _, tokens, concepts = self._for_model(sd_model)
        acting: list = []  # the enforced SPMs attached to this UNet
        if self.policy.enforced:
            enforced = self._load_enforced(arch)
            if enforced:
                acting = self._attach(g, unet, enforced, self.enforced_gate, concepts, tokens, sd_model, enforced=True)
            if not acting:
                raise ModerationUnavailable(
                    f"{PREFIX}generation refused: none of the enforced SPMs "
                    f"({', '.join(e.name for e in self.policy.enforced)}) fits the loaded {arch} model")
        spms = [(c, s) for c in user if (s := self._load_user(g, c, arch)) is not None]
        if spms and acting:
            named = lambda pairs: [(c.name, c.strength, s) for c, s in pairs]  # noqa: E731
            why = opposed(unet, named(spms), named(acting))
            if why:
                raise SPMRequestError(PREFIX + why)
        if spms:
            self._attach(g, unet, spms, g.args.gate(), concepts, tokens, sd_model, enforced=False)

    def _attach(self, g: _Generation, unet, spms, gate: GateSettings, concepts, tokens, sd_model, *,
                enforced: bool) -> list:
        """Attach a session with every SPM that fits this UNet and record what acted; those that
        do not fit are skipped (named in the note; enforced ones in the log)."""
        # each session walks the step's rows itself, so each has its own row reader
        rows = rows_for(tokens, sd_model=sd_model, opts=self.shared.opts)
        good = list(spms)
        try:
            session = self._session(unet, good, gate, concepts, rows).attach()
        except _DOES_NOT_FIT:
            good, names = [], layer_names(unet)
            for c, spm in spms:
                place = placement(spm, unet, names=names)
                if place.fits:
                    good.append((c, spm))
                elif enforced:
                    log.warning("sd-webui-spm: enforced SPM %r does not fit this model: %s", c.name, place.error)
                else:
                    self._skip(g, c.name, str(place.error))
            if not good:
                return []
            session = self._session(unet, good, gate, concepts, rows).attach()
        a = _Attached(session, rows, enforced)
        g.attached.append(a)
        self._arm_probe(a)
        acted = g.enforced_acted if enforced else g.acted
        for c, spm in good:
            acted[c.name] = (c.strength, (spm.sha256 or "")[:10])
            if spm.ungated and gate.enabled and not enforced:
                g.ungated.add(c.name)
                self._note(g, f"SPM {c.name!r} has no target concepts: it acts on every prompt (ungated)")
        return good

    @staticmethod
    def _session(unet, spms, gate: GateSettings, concepts, rows: WebUIRows) -> Session:
        return Session(unet, [(spm, c.strength) for c, spm in spms], encoder=concepts if gate.enabled else None,
                       gate=gate, conditioning_of=rows.conditioning_of, row_tokens=rows)


def _as_request_error(e: SPMError) -> SPMRefusal:
    if isinstance(e, SPMRefusal):
        return e if str(e).startswith(PREFIX) else type(e)(PREFIX + str(e))
    return SPMRequestError(PREFIX + str(e))
