"""The shapes world: data, text encoder, shipped weights, and erasure in it.

The last tests train SPMs in the shipped world for a few iterations on CPU (about a minute each)
and assert a real drop of the target concept; they carry the ``slow`` marker and run in CI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lib_spm import GateSettings, load_spm
from lib_spm.world import data
from lib_spm.world.model import WorldTextEncoder, decode_latent, encode_image, load_world
from lib_spm.world.pipeline import WorldPipeline, accuracy, eval_prompts, prompt_labels


def test_captions_and_vocabulary():
    rng = np.random.default_rng(0)
    items = data.sample_items(rng, 2000)
    caps = [it.caption for it in items]
    assert 0.05 < caps.count("") / len(caps) < 0.15  # room for classifier-free guidance
    assert any("disc" in c for c in caps) and any("plus sign" in c for c in caps)  # synonyms occur
    vocab = set(data.vocabulary())
    assert all(set(c.split()) <= vocab for c in caps)
    for it in items[:200]:
        s, c = prompt_labels(it.caption)
        assert s in (None, it.shape) and c in (None, it.colour)


def test_rendering_is_seeded_and_latents_invert():
    a, _ = data.batch(np.random.default_rng(3), 8)
    b, _ = data.batch(np.random.default_rng(3), 8)
    assert np.array_equal(a, b) and a.shape == (8, 32, 32, 3) and 0 <= a.min() and a.max() <= 1
    x = torch.from_numpy(a)
    assert torch.allclose(decode_latent(encode_image(x)), x.permute(0, 3, 1, 2), atol=1e-6)
    striped, _ = data.batch(np.random.default_rng(3), 8, style="stripes")
    assert not np.array_equal(a, striped)


def test_text_encoder_uses_sd_token_ids_through_a_compact_table():
    te = WorldTextEncoder()
    ids = te.token_ids(["a red circle"])[0]
    assert ids[:5].tolist() == [49406, 320, 736, 7117, 49407]
    assert te.tokens(["a red circle", ""]) == [(320, 736, 7117), ()]
    assert te.model.config.vocab_size == len(set(te.id_map.tolist()))  # every compact id used
    assert int(te.id_map[1125]) == 0  # "photo" is no world word: the unknown token
    assert te.encode(["a red circle"]).shape == (1, 77, 64)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return WorldPipeline(load_world())


def test_shipped_world_loads_with_its_record(pipe):
    info = pipe.world.info
    assert info["steps"] > 0
    assert info["eval"]["shape_accuracy"] >= 0.9 and info["eval"]["colour_accuracy"] >= 0.95  # as recorded
    assert pipe.world.classifier.training is False


def test_the_record_is_its_per_prompt_results_and_a_sample_reproduces(pipe):
    ev = pipe.world.info["eval"]
    per = ev["per_prompt"]
    assert list(per) == eval_prompts()  # every prompt the world is judged on, in the order it was run
    for key in ("shape", "colour"):
        assert ev[f"{key}_accuracy"] == round(sum(r[key] for r in per.values()) / len(per), 4)
    # Image i's noise depends only on (seed, i): the first m samples of the first prompt are the
    # recorded run's first m, so the record bounds how many of them may miss.
    first, n, m = eval_prompts()[0], ev["samples_per_prompt"], 4
    got = accuracy(pipe, [first], n=m, seed=ev["seed"], steps=ev["sampling_steps"], cfg=ev["cfg"])[first]
    for key in ("shape", "colour"):
        missed = round((1 - per[first][key]) * n)
        assert got[key] >= 1 - missed / m, (key, got, per[first])


def test_rows_are_gated_by_their_own_prompts_in_the_world(pipe, tmp_path):
    from lib_spm.world.erasure import train_concept

    spm = train_concept(pipe, "circle", tmp_path / "c.safetensors", iterations=2)
    with pipe.applied([(spm, 1.0)], GateSettings(metric="tokenuni")) as s:
        pipe.generate(["a red circle", "a blue square"], steps=1)
        gates = s.last_gates[:, 0].tolist()
    assert gates == [0.0, 0.0, 1.0, 0.0]  # rows: two negative prompts, then the two prompts


@pytest.mark.slow
def test_training_an_spm_really_erases_the_target(pipe, tmp_path):
    from lib_spm.world.erasure import measure, other_prompts, target_prompts, train_concept

    spm = train_concept(pipe, "circle", tmp_path / "c.safetensors", iterations=60)
    targets = target_prompts("circle")[:3]
    others = other_prompts(["circle"])[::4]
    m = measure(pipe, [(spm, 1.0)], targets, others, gate=GateSettings(enabled=False), n=6, seed=1)
    base = measure(pipe, [], targets, [], n=6, seed=1)
    assert base.target_found >= 0.8  # the world draws circles when asked
    assert m.target_found <= base.target_found - 0.4  # and far fewer with the SPM
    assert load_spm(tmp_path / "c.safetensors").metadata.targets == ["circle"]


@pytest.mark.slow
def test_demo_writes_its_report(tmp_path):
    from lib_spm.tools.demo import run_demo

    metrics = run_demo(tmp_path, concept="star", n=2, iterations=20)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert {"concept", "erase_rate", "preservation", "seconds"} <= set(metrics)
    assert metrics["concept"] == "star" and 0 <= metrics["erase_rate"] <= 1 and metrics["preservation"] >= 0
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "erase_star.safetensors").exists()
