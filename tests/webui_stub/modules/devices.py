import contextlib


def autocast():
    return contextlib.nullcontext()
