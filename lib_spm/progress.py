"""Steps and ETA of long work on a terminal: the demo, the benchmarks, CLI training.

One small printer for all of them. On a terminal it rewrites one line in place (``\\r``); into a
file or a pipe it writes a whole line at most every ``every`` seconds, plus the last one, so logs
stay short. It writes to stderr: stdout keeps the commands' JSON clean.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def clock_text(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total = label, max(int(total), 0)
        self.stream = stream if stream is not None else sys.stderr
        self.every, self.clock = every, clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self._t0 = clock()
        self._last: float | None = None
        self._closed = False

    def line(self, note: str = "") -> str:
        elapsed = self.clock() - self._t0
        parts = [f"{self.label}: {self.done}/{self.total}"]
        if self.total:
            parts.append(f"{100 * self.done // self.total}%")
        parts.append(f"elapsed {clock_text(elapsed)}")
        if 0 < self.done < self.total:
            parts.append(f"ETA {clock_text(elapsed / self.done * (self.total - self.done))}")
        if note:
            parts.append(note)
        return " · ".join(parts)

    def update(self, done: int, note: str = "") -> None:
        """``done`` steps are finished; prints when a terminal line is due (or at the end)."""
        self.done = min(max(int(done), 0), self.total) if self.total else int(done)
        now = self.clock()
        last = self.done >= self.total
        if not (self.tty or last or self._last is None or now - self._last >= self.every):
            return
        self._last = now
        self._write(self.line(note), end=last)

    def advance(self, n: int = 1, note: str = "") -> None:
        self.update(self.done + n, note)

    def close(self, note: str = "") -> None:
        """End the line on a terminal (and say where it stopped when it did not finish)."""
        if self._closed:
            return
        self._closed = True
        if self.done < self.total or note:
            self._write(self.line(note), end=True)
        elif self.tty and self._last is None:
            self._write(self.line(), end=True)

    def on_train_step(self, status) -> None:
        """``train_spm``'s ``on_step``: the step and loss of a :class:`~lib_spm.training.trainer.TrainStatus`."""
        self.update(status.step, f"loss {status.loss:.4g}")

    def _write(self, text: str, end: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if end else ""))
            if end:
                self._closed = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
