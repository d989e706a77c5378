"""The Test panel's handlers on the standalone host (the shapes world): gates per prompt as the
world's pipeline applies them, before/after images, and refusals as one line."""

from __future__ import annotations

import re

import pytest
from spm_helpers import random_spm

from lib_spm import GateSettings
from lib_spm.errors import SPMValueError
from lib_spm.ui import test_panel
from lib_spm.ui.local import LocalHost
from lib_spm.world.pipeline import WorldPipeline

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = LocalHost(tmp_path_factory.mktemp("spm"))
    random_spm(h.world.unet, ["circle"], seed=1, std=0.3, name="circle").save(h.library.root / "circle.safetensors")
    return h


def shown_gates(table_html: str) -> list[float]:
    return [float(g) for g in re.findall(r"data-gate='([0-9.]+)'", table_html)]


def test_gates_shown_are_the_gates_the_world_pipeline_applies(host):
    table, gallery = test_panel.run(host, ["circle"], "\n".join(PROMPTS) + "\n\n", True, 1.0, "pooled_tokenuni",
                                    False, 0)
    shown = shown_gates(table)
    assert len(shown) == 2 and gallery == []
    pipe = WorldPipeline(host.world)
    with pipe.applied([(host.library.load("circle"), 1.0)], GateSettings()) as s:
        pipe.generate(PROMPTS, steps=1)
        applied = s.last_gates[len(PROMPTS):, 0].tolist()  # rows: negatives, then the prompts
    assert shown == pytest.approx(applied, abs=1e-4)
    assert shown[0] == 1.0 > shown[1]  # the target opens the gate, the unrelated prompt much less
    assert "one row per prompt" in table  # the host says what its rows do not model


def test_before_after_images_for_a_seed(host):
    table, gallery = test_panel.run(host, ["circle"], "a red circle", False, 1.0, "pooled_tokenuni", True, 3)
    assert shown_gates(table) == [1.0] and "FT off" in table
    assert [caption for _, caption in gallery] == ["without: a red circle", "with: a red circle"]
    (before, _), (after, _) = gallery
    assert before.shape == after.shape == (128, 128, 3)
    assert (before != after).any()  # the SPM changed the image


@pytest.mark.parametrize("names, text, factor, metric, message", [
    (["circle"], "\n \n", 1.0, "pooled", "at least one prompt"),
    ([], "a circle", 1.0, "pooled", "at least one SPM"),
    (["../x"], "a circle", 1.0, "pooled", r"\.\."),
    (["circle"], "a circle", -1.0, "pooled", "FT factor"),
    (["circle"], "a circle", 1.0, "cosine", "unknown gate metric"),
    (["nothing"], "a circle", 1.0, "pooled", "nothing"),
])
def test_refusals_are_one_line_in_the_table(host, names, text, factor, metric, message):
    table, gallery = test_panel.run(host, names, text, True, factor, metric, False, 0)
    assert table.startswith("<p class='spm-bad'>") and re.search(message, table) and gallery == []


def test_api_body_is_checked_field_by_field(host):
    out = test_panel.api(host, {"prompts": ["a red circle"], "spms": ["circle"], "metric": "tokenuni"})
    assert [g["gate"] for g in out["gates"]] == [1.0]
    assert out["settings"]["circle"] == {"ft": True, "factor": 1.0, "metric": "tokenuni"}
    for body, message in [([], "JSON object"), ({"spms": ["circle"]}, "'prompts' is required"),
                          ({"prompts": ["x"], "spms": ["circle"], "seed": 1}, "unknown field"),
                          ({"prompts": "x", "spms": "circle"}, "list of SPM names"),
                          ({"prompts": ["x"], "spms": ["circle"], "ft": "maybe"}, "true or false")]:
        with pytest.raises(SPMValueError, match=message):
            test_panel.api(host, body)


def test_render_marks_enforced_columns_and_lists_what_was_skipped():
    from lib_spm.runtime.gate_report import GateReport, GateValue, Part

    rep = GateReport(["a red circle"], [[Part("", "a red circle")]], [[1]],
                     [GateValue(0, 0, None, "nsfw", "nsfw", True, 0.25),
                      GateValue(0, 0, None, "mine", "mine", False, 1.0)],
                     {"nsfw": GateSettings(), "mine": GateSettings(enabled=False)}, {"old": "it is for sdxl"})
    out = test_panel.render(rep)
    assert "<th>&#128274; nsfw</th><th>mine</th>" in out and "enforced by the operator" in out
    assert shown_gates(out) == [0.25, 1.0] and "mine: FT off" in out and "old: it is for sdxl" in out
    rep.values = [v for v in rep.values if not v.enforced]
    assert "enforced by the operator" not in test_panel.render(rep)
