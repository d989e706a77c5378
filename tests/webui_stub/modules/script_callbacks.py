"""``modules.script_callbacks`` (v1.10.1): every callback runs inside ``try/except Exception``
and what it raises is only reported (``report_exception``), as in the WebUI."""
from collections import defaultdict

from modules import errors

callbacks = defaultdict(list)


def _adder(name):
    def add(callback, *, name_=None):
        callbacks[name].append(callback)
    add.__name__ = f"on_{name}"
    return add


for _n in ("before_ui", "ui_settings", "ui_tabs", "app_started", "cfg_denoiser", "model_loaded", "script_unloaded"):
    globals()[f"on_{_n}"] = _adder(_n)


def fire(name, *args):
    """Run every callback of ``name``; a failing one is reported and the rest still run."""
    out = []
    for cb in list(callbacks[name]):
        try:
            out.append(cb(*args))
        except Exception:
            errors.report(f"Error executing callback {name}_callback for {getattr(cb, '__module__', cb)}",
                          exc_info=True)
    return out


def clear():
    callbacks.clear()
