from collections import defaultdict

callbacks = defaultdict(list)


def _adder(name):
    def add(callback, *, name_=None):
        callbacks[name].append(callback)
    add.__name__ = f"on_{name}"
    return add


for _n in ("before_ui", "ui_settings", "ui_tabs", "app_started", "cfg_denoiser", "model_loaded", "script_unloaded"):
    globals()[f"on_{_n}"] = _adder(_n)


def fire(name, *args):
    return [cb(*args) for cb in list(callbacks[name])]


def clear():
    callbacks.clear()
