"""The terminal progress printer: throttled whole lines into files, one rewritten line on a terminal.

A fake clock drives it, so nothing here depends on how fast the machine is."""

from __future__ import annotations

import io

from lib_spm.progress import Progress, clock_text
from lib_spm.training.trainer import TrainStatus


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_into_a_file_one_line_per_period_and_the_last():
    clock, out = Clock(), io.StringIO()
    p = Progress("train", 10, stream=out, every=5.0, clock=clock)
    for step in range(1, 11):
        clock.now += 2.0  # 2 s per step
        p.update(step, f"loss {step}")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "train: 1/10 · 10% · elapsed 0:02 · ETA 0:18 · loss 1"
    assert [line.split(" ·")[0] for line in lines] == ["train: 1/10", "train: 4/10", "train: 7/10", "train: 10/10"]
    assert "ETA" not in lines[-1] and "elapsed 0:20" in lines[-1]


def test_on_a_terminal_one_line_rewritten_in_place_and_ended():
    clock, out = Clock(), Terminal()
    p = Progress("bench", 3, stream=out, clock=clock)
    for _ in range(3):
        clock.now += 1.0
        p.advance()
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("bench: 3/3 · 100% · elapsed 0:03\n")
    assert text.count("\n") == 1


def test_a_stopped_run_says_where_it_stopped_and_train_steps_show_the_loss():
    clock, out = Clock(), io.StringIO()
    p = Progress("training", 250, stream=out, clock=clock)
    clock.now += 30
    p.on_train_step(TrainStatus(step=5, total=250, loss=0.125, erase_loss=0.1, anchor_loss=0.0, lr=0.01,
                                seconds=1.0, eta_seconds=0.0, passes=32))
    p.close("cancelled")
    first, last = out.getvalue().splitlines()
    assert first == "training: 5/250 · 2% · elapsed 0:30 · ETA 24:30 · loss 0.125"
    assert last.endswith("cancelled") and "5/250" in last
    assert clock_text(3725) == "1:02:05"
