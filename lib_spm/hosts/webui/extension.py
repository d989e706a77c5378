"""The extension's state inside the WebUI, and the pieces of its glue that are plain functions.

``scripts/spm.py`` subclasses the WebUI's classes and registers callbacks; everything it does
beyond that lives here so it can be tested with stand-ins. One :class:`Extension` per WebUI
process owns the SPM folder, the generation controller and the job runner.
"""

from __future__ import annotations

import contextlib
import html
import os
import threading
from pathlib import Path

from ...errors import SPMError, SPMForbidden, SPMRefusal, SPMRequestError
from ...operations.library import UNGATED, SPMLibrary
from ...runtime.gating import GateSettings
from ...runtime.moderation import Policy
from ...training.jobs import JobRunner
from .controller import SPMController
from .gateway import Gateway, webui
from .model import model_arch

SECTION = ("spm", "Concept erasure (SPM)")
TAG = "spm"


def spm_dir(cmd_opts, models_path: str | os.PathLike) -> Path:
    """``--spm-dir``, else ``models/spm`` under the WebUI's models folder (which follows --data-dir)."""
    folder = getattr(cmd_opts, "spm_dir", None)
    return Path(folder) if folder else Path(models_path) / "spm"


class Extension:
    """Everything the extension keeps between requests."""

    def __init__(self, root: Path, *, policy: Policy = Policy(), shared=None):
        root.mkdir(parents=True, exist_ok=True)
        self.library = SPMLibrary(root)
        self.policy = policy
        self.controller = SPMController(self.library, policy=policy, shared=shared)
        self.jobs = JobRunner()  # training/merging: one at a time, and found again after a page reload
        self.webui = Gateway(shared=shared)  # the WebUI's modules (stand-ins in tests)

    @classmethod
    def from_webui(cls) -> "Extension":
        shared = webui("shared")
        paths = webui("paths")
        policy = Policy.parse(getattr(shared.cmd_opts, "spm_enforce", None),
                              lockdown=bool(getattr(shared.cmd_opts, "spm_lockdown", False)))
        ext = cls(spm_dir(shared.cmd_opts, paths.models_path), policy=policy)
        ext.controller.check_policy()  # start-up: say which files cannot act (models are checked as they load)
        return ext

    @property
    def read_only(self) -> str | None:
        """Why the tab may not write SPMs or checkpoints (``--spm-lockdown``), or None."""
        if self.policy.lockdown:
            return ("The operator has locked this server (--spm-lockdown): SPMs cannot be trained, merged, "
                    "baked, renamed, edited or deleted here, and user SPMs are off.")
        return None

    @property
    def shared(self):
        return self.webui.shared

    def default_args(self) -> dict:
        """The accordion's defaults from the settings section."""
        opts = self.shared.opts
        return {
            "ft": bool(getattr(opts, "spm_ft_default", True)),
            "factor": float(getattr(opts, "spm_ft_factor", 1.0)),
            "metric": str(getattr(opts, "spm_ft_metric", GateSettings.metric)),
        }

    def names(self) -> list[str]:
        return [e.name for e in self.library.entries() if e.error is None]

    def locked_html(self) -> str:
        """The operator's SPMs, shown locked in the accordion."""
        pol = self.policy
        if not (pol.enforcing or pol.lockdown):
            return ""
        if pol.error:
            body = html.escape(pol.error) + " Every generation is refused until the operator fixes it."
        else:
            body = "Always applied, cannot be changed: " + html.escape(", ".join(
                f"{e.name}:{e.strength:g}" for e in pol.enforced) or "(none)")
            body += (" User SPMs are off on this server." if pol.lockdown else
                     " Your SPMs add to these; negative strengths are refused.")
        return f"<p class='spm-locked'>\U0001f512 Enforced by the operator. {body}</p>"

    def describe(self, names) -> str:
        """HTML under the accordion: each chosen SPM's targets and whether it fits the loaded model."""
        arch = None
        with contextlib.suppress(Exception):
            arch = model_arch(self.shared.sd_model)
        rows = []
        for name in names:
            if not name or name == "None":
                continue
            try:
                e = self.library.get(name)
            except SPMError as err:
                rows.append(f"<li class='spm-bad'>{html.escape(name)}: {html.escape(str(err))}</li>")
                continue
            if e.error:
                rows.append(f"<li class='spm-bad'>{html.escape(name)}: {html.escape(e.error)}</li>")
                continue
            fits = arch is None or e.arch is None or e.arch == arch
            fit = "" if fits else f" <span class='spm-bad'>for {html.escape(str(e.arch))}, the loaded model is {arch}</span>"
            targets = ", ".join(e.targets) or UNGATED
            rows.append(f"<li><b>{html.escape(name)}</b> ({html.escape(str(e.arch or '?'))}, rank {e.rank}): "
                        f"erases {html.escape(targets)}{fit}</li>")
        return f"<ul class='spm-describe'>{''.join(rows)}</ul>" if rows else ""

    # -- extra networks cards -------------------------------------------------------------------
    def card(self, page, name: str, index: int | None, quote_js, default_multiplier: str) -> dict | None:
        """The item dict ``ExtraNetworksPage.create_item`` returns for one SPM."""
        try:
            e = self.library.get(name)
        except SPMError:
            return None
        path = str(e.path)
        stem = path[: -len(".safetensors")]
        desc = e.description or page.find_description(stem)
        return {
            "name": name,
            "filename": path,
            "shorthash": e.short_hash,
            "preview": page.link_preview(str(e.preview)) if e.preview else None,  # ours: stays inside, owned
            "description": desc,
            "search_terms": [page.search_terms_from_path(path), e.short_hash, *e.targets],
            "local_preview": f"{stem}.{getattr(self.shared.opts, 'samples_format', 'png')}",
            "metadata": e.metadata,
            "sort_keys": {"default": index, **page.get_sort_keys(path)},
            "prompt": quote_js(f"<{TAG}:{name}:") + " + " + default_multiplier + " + " + quote_js(">"),
        }

    # -- API ------------------------------------------------------------------------------------
    def api_list(self) -> list[dict]:
        """The SPM folder for ``/spm/v1/models``."""
        out = []
        for e in self.library.entries():
            out.append({"name": e.name, "targets": list(e.targets), "arch": e.arch, "rank": e.rank,
                        "size": e.size_bytes, "hash": e.sha256, "description": e.description, "error": e.error})
        return out

    def api_gates(self, body) -> dict:
        """``/spm/v1/gates``: the Test panel's gate table. Off under ``--spm-lockdown`` (as the
        panel is: gate values would show users how to word around the enforced SPMs)."""
        if self.policy.lockdown:
            raise SPMForbidden("the operator has locked this server (--spm-lockdown): gate tests are off")
        from ...ui import test_panel
        from .tab import WebUIHost

        try:
            return test_panel.api(WebUIHost(self), body)
        except SPMRefusal:
            raise
        except SPMError as e:
            raise SPMRequestError(str(e)) from None

    def shutdown(self) -> None:
        self.controller.shutdown()


# One Extension per WebUI process, made under a lock: at start-up a real v1.10.1 loads the model
# in a thread (on_model_loaded) while the main thread runs the UI callbacks, and both asked for
# the Extension at once; two were made, one guarding the UNet and the other attaching the
# enforced SPMs, so every enforced generation was refused. release() runs from on_script_unloaded.
_instance: list[Extension] = []
_instance_lock = threading.Lock()


def extension() -> Extension:
    """The process's Extension, made from the WebUI's flags on first use (from any thread).

    Making it must not read ``shared.sd_model``: at start-up that property waits for the model
    the loading thread is loading, and that thread's on_model_loaded waits for this lock."""
    with _instance_lock:
        if not _instance:
            _instance.append(Extension.from_webui())
        return _instance[0]


def release() -> None:
    """Detach everything and forget the Extension (scripts reloading, or tests unloading)."""
    with _instance_lock:
        while _instance:
            _instance.pop().shutdown()


def answer(fn):
    """Call an API handler; a refusal becomes FastAPI's HTTPException with its status and message.
    FastAPI answers those itself: the WebUI's own handler, which reads ``status_code`` from any
    exception, is installed only with ``--api``, and these routes exist without it."""
    try:
        return fn()
    except SPMRefusal as e:
        from fastapi import HTTPException

        raise HTTPException(status_code=e.status_code, detail=str(e)) from None


def api_auth_dependency(cmd_opts):
    """A FastAPI dependency that checks ``--api-auth`` credentials like the WebUI's own API does."""
    creds = getattr(cmd_opts, "api_auth", None)
    if not creds:
        return []
    import secrets

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    allowed = dict(c.split(":", 1) for c in creds.strip('"').replace("\n", "").split(",") if ":" in c)
    basic = HTTPBasic()

    def check(credentials: HTTPBasicCredentials = Depends(basic)):
        want = allowed.get(credentials.username)
        if want is None or not secrets.compare_digest(credentials.password, want):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
        return True

    return [Depends(check)]
