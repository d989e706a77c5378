"""The gate report (lib_spm/runtime/gate_report.py) against the runtime: a reported gate is the gate the
hooks apply to that row, per AND part and per 75-token chunk, on tiny seeded models."""

import pytest
import torch
from models import L, ToyEncoder, tiny_sd1, tiny_sdxl
from spm_helpers import random_spm

from lib_spm import GateSettings, Session, SPMValueError
from lib_spm.format.metadata import Slice
from lib_spm.runtime.gate_report import MAX_PROMPTS, Part, Probe, check_prompts, report

enc = ToyEncoder()
PER = L - 2  # words per toy chunk (one token per word)
FILLER = "a landscape with trees and hills under clouds"  # 8 words: the concept lands in chunk 2


class ToyRows:
    """PromptRows as a WebUI-like host makes them: ``AND`` splits rows, chunks of PER tokens."""

    chunk = L

    def parts(self, prompt):
        subs = [s.strip() for s in prompt.split(" AND ")]
        return [Part(f"AND {j + 1}" if len(subs) > 1 else "", s) for j, s in enumerate(subs)]

    def conditioning(self, text):
        words = text.split() or [""]
        return torch.cat([enc.encode_one(" ".join(words[c : c + PER])) for c in range(0, len(words), PER)])[None]

    def row_tokens(self, text):
        return tuple(enc.ids(text))


@pytest.fixture(scope="module")
def model():
    unet = tiny_sd1()
    circle = random_spm(unet, ["circle"], seed=1, name="circle")
    star = random_spm(unet, ["star"], seed=2, name="star")
    return unet, circle, star


def runtime_gates(unet, spms, texts, gate=GateSettings()):
    """What the hooks apply: one UNet call with these rows, the session told their tokens."""
    rows = ToyRows()
    cond = torch.cat([rows.conditioning(t) for t in texts])
    tokens = [rows.row_tokens(t) for t in texts]
    with Session(unet, [(s, 1.0) for s in spms], encoder=enc, gate=gate, row_tokens=lambda B: tokens) as s:
        with torch.no_grad():
            unet(torch.randn(len(texts), 4, 8, 8), 10, encoder_hidden_states=cond)
        return s.last_gates.clone()


def probes(*spms, gate=GateSettings()):
    return [Probe(s.name, s, gate) for s in spms]


def test_reported_gates_are_the_gates_the_runtime_applies(model):
    unet, circle, star = model
    prompts = ["a red circle", "a dog in a field", "a star AND a circle"]
    rep = report(unet, probes(circle, star), prompts, ToyRows(), enc)
    rows = ["a red circle", "a dog in a field", "a star", "a circle"]
    where = [(0, 0), (1, 0), (2, 0), (2, 1)]
    applied = runtime_gates(unet, [circle, star], rows)  # both SPMs in one session, as a generation has them
    for r, (i, j) in enumerate(where):
        assert rep.gate("circle", i, j) == pytest.approx(float(applied[r, 0]), abs=1e-6), rows[r]
        assert rep.gate("star", i, j) == pytest.approx(float(applied[r, 1]), abs=1e-6), rows[r]
    assert [[q.label for q in ps] for ps in rep.parts] == [[""], [""], ["AND 1", "AND 2"]]
    # a target prompt gates higher than an unrelated one, and each AND part has its own gate
    assert rep.gate("circle", 0) == 1.0 and rep.gate("circle", 1) < 0.9
    assert rep.gate("circle", 2, 1) > rep.gate("circle", 2, 0)
    assert rep.gate("star", 2, 0) > rep.gate("star", 2, 1)


def test_each_chunk_of_a_long_prompt_is_reported_as_the_runtime_scores_it(model):
    unet, circle, _ = model
    prompt = f"{FILLER} circle"
    rep = report(unet, probes(circle), [prompt], ToyRows(), enc)
    assert rep.chunks == [[2]]
    # the row: the runtime's gate for the whole long prompt
    assert rep.gate("circle", 0) == pytest.approx(float(runtime_gates(unet, [circle], [prompt])[0, 0]), abs=1e-6)
    # each chunk: the runtime's gate for a row that holds only that chunk's words
    words = prompt.split()
    for c in range(2):
        alone = " ".join(words[c * PER : (c + 1) * PER])
        want = float(runtime_gates(unet, [circle], [alone])[0, 0])
        assert rep.gate("circle", 0, 0, c) == pytest.approx(want, abs=1e-6), alone
    assert rep.gate("circle", 0, 0, 1) == 1.0 > rep.gate("circle", 0, 0, 0)  # the concept is in chunk 2
    assert rep.gate("circle", 0) == max(rep.gate("circle", 0, 0, c) for c in range(2))


def test_gate_settings_in_force_are_the_ones_reported(model):
    unet, circle, _ = model
    off = report(unet, probes(circle, gate=GateSettings(enabled=False)), ["a dog"], ToyRows(), enc)
    assert off.gate("circle", 0) == 1.0 and off.settings["circle"].enabled is False
    for metric in ("clipcos", "tokenuni", "pooled"):
        g = GateSettings(metric=metric, factor=2.0)
        rep = report(unet, probes(circle, gate=g), ["a dog near a circle"], ToyRows(), enc)
        want = float(runtime_gates(unet, [circle], ["a dog near a circle"], gate=g)[0, 0])
        assert rep.gate("circle", 0) == pytest.approx(want, abs=1e-6), metric
        assert rep.as_dict()["settings"]["circle"] == {"ft": True, "factor": 2.0, "metric": metric}


def test_pack_slices_and_enforced_probes_are_reported_apart(model):
    unet = model[0]
    pack = random_spm(unet, ["circle", "square"], rank=2, seed=5, name="pack",
                      slices=[Slice("c", ("circle",), 1), Slice("s", ("square",), 1)])
    rep = report(unet, [Probe("pack", pack, GateSettings(), enforced=True)], ["a red circle"], ToyRows(), enc)
    assert rep.slices == ["pack:c", "pack:s"]
    assert rep.gate("pack:c", 0) == 1.0 > rep.gate("pack:s", 0)
    assert all(v["enforced"] for v in rep.as_dict()["gates"])


def test_an_spm_for_another_model_is_skipped_with_the_reason(model):
    unet, circle, _ = model
    other = random_spm(tiny_sdxl(), ["circle"], name="other")
    rep = report(unet, [Probe("other", other, GateSettings()), *probes(circle)], ["a circle"], ToyRows(), enc)
    assert rep.skipped.get("other")
    assert rep.slices == ["circle"]


@pytest.mark.parametrize("bad, message", [
    ([], "at least one"), ("a circle", "list of strings"), ([1], "list of strings"),
    (["x"] * (MAX_PROMPTS + 1), "at most"), (["x" * 5000], "characters"),
])
def test_bad_prompts_are_refused_with_a_clear_message(bad, message):
    with pytest.raises(SPMValueError, match=message):
        check_prompts(bad)
