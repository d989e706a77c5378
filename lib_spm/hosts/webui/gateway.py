"""The one place the extension looks up the WebUI's ``modules``.

Lookups happen when a function needs them, never at import time (the core and the tests import
this package without a WebUI). Objects that take ``shared=`` use it instead of the real module,
which is how tests hand in a stand-in.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def webui(name: str) -> ModuleType:
    """The WebUI's ``modules.<name>`` (ImportError outside the WebUI)."""
    return importlib.import_module(f"modules.{name}")


def forge(name: str) -> ModuleType:
    """Forge's ``backend.<name>`` (ImportError outside Forge)."""
    return importlib.import_module(f"backend.{name}")


class Gateway:
    """The WebUI's modules as one object: stand-ins given by name replace the real ones."""

    def __init__(self, **standins):
        self._standins = {k: v for k, v in standins.items() if v is not None}

    def module(self, name: str):
        hit = self._standins.get(name)
        return hit if hit is not None else webui(name)

    @property
    def shared(self):
        """``modules.shared``: ``sd_model``, ``opts``, ``cmd_opts``, ``state``."""
        return self.module("shared")
