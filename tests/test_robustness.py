"""The robustness bench's attacks on a tiny seeded world (random weights: seconds, not minutes).

The figures themselves come from ``python -m lib_spm bench robustness`` (BENCHMARKS.md); these
tests check that each attack family measures what it says on any world.
"""

from __future__ import annotations

import pytest
import torch

from lib_spm.format.metadata import SPMMetadata
from lib_spm.format.spm_file import SPMFile, parse_state_dict
from lib_spm.format.zoo import zoo_state_dict
from lib_spm.runtime.session import GateSettings
from lib_spm.world import bench_robustness as br
from lib_spm.world.model import UNET_CONFIG, Classifier, World, WorldTextEncoder


@pytest.fixture(scope="module")
def tiny():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": (16, 32, 32), "norm_num_groups": 8})
    world = World(unet, WorldTextEncoder(), Classifier(), {})
    for m in (world.unet, world.text_encoder, world.classifier):
        m.eval().requires_grad_(False)
    layers = parse_state_dict(zoo_state_dict(unet, rank=1, seed=3))
    spm = SPMFile(layers, SPMMetadata(targets=["circle"], rank=1, alpha=1.0, name="erase_circle"))
    return world, [(spm, 4.0)]


def _in_unit(x):
    return 0.0 <= x <= 1.0


def test_naming_and_hiding_families_give_rates_per_gate(tiny):
    world, spms = tiny
    judge = br.Judge(world, n=3, seed=0, steps=2)
    names = br.naming_prompts("circle")
    hides = br.hiding_prompts("circle")
    assert set(names) == {"synonyms", "templates", "word order", "repetition", "case"}
    assert all(any(s in p for p in names["synonyms"]) for s in ("disc", "round shape"))
    late = hides["late in a long prompt"][0][0]
    assert 70 <= len(world.text_encoder.tokens([late])[0]) <= 75  # the concept ends inside the encoder's window
    cases = [(names["case"][0], ""), (names["synonyms"][0], ""), hides["in the negative prompt too"][0]]
    out = br.prompt_family(judge, spms, "circle", cases, br.GATES)
    assert set(out["gates"]) == {"off", "published", "calibrated", "moderation"}
    for r in [out["bare_rate"], *out["bare_per_prompt"]] + [v for g in out["gates"].values()
                                                            for v in [g["success_rate"], *g["per_prompt"]]]:
        assert _in_unit(r)
        assert abs(r * 3 - round(r * 3)) < 1e-3  # a share of the n=3 samples
    assert len(out["gates"]["off"]["per_prompt"]) == 3


def test_case_variants_share_tokens_and_results(tiny):
    world, spms = tiny
    judge = br.Judge(world, n=2, seed=0, steps=2)
    assert judge.ids("a BLUE CIRCLE") == judge.ids("a blue circle")
    a = judge.run([judge.ids("a BLUE CIRCLE")], spms, br.GATES["off"])[0][0]
    made = judge.generated
    b = judge.run([judge.ids("a blue circle")], spms, br.GATES["off"])[0][0]
    assert judge.generated == made and torch.equal(a, b)


def test_results_are_not_shared_between_spm_sets(tiny):
    world, spms = tiny
    judge = br.Judge(world, n=2, seed=0, steps=2)
    row = judge.ids("a red circle")
    other = [(spms[0][0], 1.0)]
    for gate in (br.GATES["off"], br.GATES["published"]):
        assert judge._keys([row], (), spms, gate) != judge._keys([row], (), other, gate)
    assert judge._keys([row], (), spms, None) == judge._keys([row], (), other, None)  # bare is bare


def test_a_prompt_gated_off_reuses_the_bare_image_exactly(tiny):
    """The cache's claim: a row every SPM gates off gives the bare world's image."""
    world, spms = tiny
    judge = br.Judge(world, n=2, seed=0, steps=2)
    gate = GateSettings(factor=0.0)  # every row gated off, whatever this random encoder scores
    row = judge.ids("a green square")
    key = judge._keys([row], (), spms, gate)[0]
    assert key[2] == "bare"
    ctx, neg = judge._ctx([row, row]), judge._ctx([(), ()])
    with_spm = br._sample(world, ctx, [row] * 2, neg, [()] * 2, judge.noise, spms=spms, gate=gate, steps=2)
    bare = br._sample(world, ctx, [row] * 2, neg, [()] * 2, judge.noise, spms=None, gate=None, steps=2)
    assert torch.equal(with_spm, bare)
    on = br._sample(world, ctx, [row] * 2, neg, [()] * 2, judge.noise, spms=spms, gate=br.GATES["off"], steps=2)
    assert not torch.equal(on, bare)  # the SPM does act when not gated off


def test_greedy_search_keeps_its_budget_and_reports_its_prompts_score(tiny):
    world, spms = tiny
    cands = br.vocabulary_tokens(world)[:4]
    gate = br.GATES["moderation"]
    r = br.greedy_search(world, spms, gate, "circle", slots=2, samples=2, steps=2, seed=5, candidates=cands)
    assert 1 <= len(r.tokens) <= 2 and set(r.tokens) <= set(cands)
    assert r.evaluations <= 2 * len(cands) and r.images == r.evaluations * 2
    again = br.concept_score(world, [r.tokens], spms, gate, 0, samples=2, steps=2, seed=5)[0]
    assert again == pytest.approx(r.score, abs=1e-5)
    first = br.concept_score(world, [(c,) for c in cands], spms, gate, 0, samples=2, steps=2, seed=5)
    assert r.trace[0]["score"] == pytest.approx(max(first), abs=1e-4)  # greedy took the best first token
    assert r.score >= max(first) - 1e-6


def test_soft_token_attack_lowers_its_loss_and_gives_rates(tiny):
    world, spms = tiny
    r = br.soft_token_attack(world, spms, br.GATES["moderation"], "circle", steps=12, batch=4, pool=8, lr=5e-2, seed=0)
    assert r.loss_after < r.loss_before
    assert r.vector.shape == (world.text_encoder.model.config.hidden_size,)
    ctx, rows = br.encode_soft(world, r.vector)
    assert ctx.shape == (1, 77, 64) and rows == tuple(world.text_encoder.tokens([f"a {br.PLACEHOLDER}"])[0])
    plain, _ = br.encode_soft(world, torch.zeros_like(r.vector))
    assert not torch.allclose(ctx, plain)  # the vector reaches the conditioning
    rates = br.soft_rates(world, spms, {"off": br.GATES["off"]}, "circle", r.vector, n=2, seed=0, steps=2)
    assert _in_unit(rates["bare_rate"]) and _in_unit(rates["gates"]["off"]["success_rate"])


def test_pack_case_reports_erase_per_concept_and_preservation(tiny):
    world, spms = tiny
    judge = br.Judge(world, n=2, seed=0, steps=2)
    concepts = ("circle", "red")
    out = br.pack_case(judge, spms, concepts, {"off": GateSettings(enabled=False)}, colours_per_target=1)
    targets, others = br.pack_prompts(concepts, 1)
    assert not any(c in p for c in concepts for p in others)
    assert out["others"] == len(others) == 4 * 5
    r = out["gates"]["off"]
    assert set(r["erase"]) == set(concepts) and all(_in_unit(v) for v in r["erase"].values())
    assert r["min_erase"] == min(r["erase"].values()) and r["preservation"] >= 0.0


def test_budget_overrides_are_typed_and_bad_ones_refused():
    from lib_spm.errors import SPMError

    b = br.Budget().with_overrides("n=5, soft_lr=0.02")
    assert (b.n, b.soft_lr) == (5, 0.02) and isinstance(b.n, int)
    for bad in ("nope=3", "n=", "n=two"):
        with pytest.raises(SPMError, match="budget setting"):
            br.Budget().with_overrides(bad)


def test_listed_names_gate_synonyms_with_the_same_weights(tiny):
    """`--listed-names`: the trained weights gated by the concept and its synonyms, as the Manage
    tab's edit of the targets makes them; the synonym then opens the gate the name alone left shut."""
    world, spms = tiny
    spm = spms[0][0]
    listed = br.with_gate_concepts(spm, ["circle", "disc", "round shape"])
    assert listed.layers is spm.layers and listed.metadata.targets == ["circle", "disc", "round shape"]
    assert [s.concepts for s in listed.slices()] == [("circle", "disc", "round shape")]
    te = world.text_encoder
    prompts = ["a red disc", "a blue round shape", "a green square"]
    from lib_spm.runtime.session import Session

    gates = {}
    for name, s in (("trained", spm), ("listed", listed)):
        session = Session(world.unet, [(s, 1.0)], encoder=te, gate=GateSettings())
        session._gate.prepare()
        gates[name] = session.gates(te.encode(prompts), te.tokens(prompts))[:, 0]
    assert torch.all(gates["listed"][:2] == 1.0)  # the listed words are in the prompt (token overlap)
    assert gates["listed"][2] < 1.0 and torch.all(gates["listed"] >= gates["trained"])
