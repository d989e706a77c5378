"""``modules.errors`` (v1.10.1): ``report`` prints and records; nothing is raised. Tests read
``reported`` to see what the WebUI would have printed as ``*** Error ...``."""
import sys
import traceback

reported = []


def report(message, *, exc_info=False):
    reported.append((message, traceback.format_exc() if exc_info else None))
    print("***", message, file=sys.stderr)


def display(e, task, *, full_traceback=False):
    reported.append((f"{task}: {type(e).__name__}: {e}", None))
    print(f"{task}: {type(e).__name__}: {e}", file=sys.stderr)
