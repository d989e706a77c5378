"""Facilitated Transport scoring as pure functions: three tensors in, one out."""

import pytest
import torch
from models import L, ToyEncoder

from lib_spm import GateSettings, SPMValueError
from lib_spm.runtime.functional import clip_cosine, concept_scores, lowrank_bypass, slice_gates, token_overlap

enc = ToyEncoder()


def test_clip_cosine_of_a_prompt_with_itself_is_one_and_matches_torch():
    e = enc.encode(["a red circle", "a dog"])
    s = clip_cosine(e, e)
    assert torch.allclose(s.diagonal(), torch.ones(2), atol=1e-6)
    ref = torch.cosine_similarity(e[0].flatten(), e[1].flatten(), dim=0)
    assert torch.allclose(s[0, 1], ref, atol=1e-6)


def test_long_prompts_take_the_best_chunk():
    """75-token chunks are concatenated by the host; the concept may sit in any chunk."""
    target = enc.encode(["circle"])
    filler, hit = enc.encode(["a landscape with trees"]), enc.encode(["circle"])
    long_row = torch.cat([filler, hit], dim=1)  # [1, 2L, D]
    assert long_row.shape[1] == 2 * L
    s = clip_cosine(long_row, target)
    assert torch.allclose(s, torch.ones(1, 1), atol=1e-6)
    assert clip_cosine(filler, target) < s
    with pytest.raises(ValueError, match="chunks"):
        clip_cosine(torch.zeros(1, L + 1, enc.width), target)


def test_token_overlap_counts_target_tokens_and_ignores_unknown_rows():
    rows = [(1, 2, 3, 2), None, ()]
    concepts = [(2, 9), (1, 2, 3), ()]
    out = token_overlap(rows, concepts)
    assert out.tolist() == [[0.5, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("metric", ["clipcos", "tokenuni", "clipcos_tokenuni"])
def test_metric_is_the_max_of_the_scores_it_names(metric):
    prompts, concepts = ["a red circle", "a dog"], ["circle", "red dog"]
    cos = clip_cosine(enc.encode(prompts), enc.encode(concepts))
    tok = token_overlap(enc.tokens(prompts), enc.tokens(concepts))
    got = concept_scores(metric, enc.encode(prompts), enc.encode(concepts), enc.tokens(prompts), enc.tokens(concepts))
    want = {"clipcos": cos, "tokenuni": tok, "clipcos_tokenuni": torch.maximum(cos, tok)}[metric]
    assert torch.allclose(got, want)


def test_slice_gates_take_the_max_over_concepts_scale_and_clamp():
    scores = torch.tensor([[0.2, 0.6, -0.5], [0.9, 0.1, 0.3]])
    g = slice_gates(scores, [[0, 1], [2], []], factor=1.5)
    assert torch.allclose(g, torch.tensor([[0.9, 0.0, 1.0], [1.0, 0.45, 1.0]]))


def test_gate_settings_are_validated():
    with pytest.raises(SPMValueError):
        GateSettings(metric="cosine")
    with pytest.raises(SPMValueError):
        GateSettings(factor=-1.0)


def test_bypass_is_linear_in_each_column_coefficient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=g)
    down, up = torch.randn(3, 6, generator=g), torch.randn(4, 3, generator=g)
    coef = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]])
    got = lowrank_bypass(x, down, up, coef)
    for b in range(2):
        want = sum(coef[b, i] * torch.outer(up[:, i], down[i]) for i in range(3))
        assert torch.allclose(got[b], x[b] @ want.T, atol=1e-5)


def test_content_mask_finds_each_chunks_own_tokens():
    from lib_spm.runtime.functional import content_mask

    m = content_mask([3, None, 5], T=2 * 5, L=5)  # chunks of 5 slots hold 3 prompt tokens each
    assert m[0].tolist() == [False, True, True, True, False] + [False] * 5
    assert not m[1].any()
    assert m[2].tolist() == [False, True, True, True, False, False, True, True, False, False]


def test_pooled_cosine_compares_end_states_centred_on_the_empty_prompt():
    from lib_spm.runtime.functional import calibrate, end_states, pooled_cosine

    e = enc.encode(["a red circle", "a blue square", "circle"])
    null = enc.encode([""])
    ends = end_states(e, [3, 3, 1], L)
    assert torch.equal(ends[0, 0], e[0, 4]) and torch.equal(ends[2, 0], e[2, 2])
    got = pooled_cosine(e, [3, 3, None], e[2:], [1], null)
    want = torch.cosine_similarity(e[0, 4] - null[0, 1], e[2, 2] - null[0, 1], dim=0)
    assert torch.allclose(got[0, 0], want, atol=1e-6) and got[2].isnan().all()
    assert torch.allclose(calibrate(torch.tensor([[0.2, 0.6, 1.0]]), torch.tensor([0.6, 0.6, 0.6])),
                          torch.tensor([[0.0, 0.0, 1.0]]))


def test_calibrated_session_floors_ignore_references_that_name_the_concept():
    from lib_spm.runtime.gating import ConceptGate

    refs = ("a circle of friends", "a dog", "a house")
    gate = ConceptGate(GateSettings(metric="pooled", reference_prompts=refs), [("circle",)], enc)
    assert gate.calibration is None  # nothing encoded before prepare()
    gate.prepare()
    null, floor = gate.calibration
    e = enc.encode(list(refs) + ["circle"])
    from lib_spm.runtime.functional import pooled_cosine
    raw = pooled_cosine(e[:3], [len(t) for t in enc.tokens(list(refs))], e[3:], [1], null)
    assert torch.allclose(floor, raw[1:].mean(dim=0).clamp(min=0))  # "a circle of friends" left out


def test_calibrated_metric_falls_back_to_the_cosine_for_rows_of_unknown_text():
    e, c = enc.encode(["a red circle", "a dog"]), enc.encode(["circle"])
    null, floor = enc.encode([""]), torch.tensor([0.2])
    got = concept_scores("pooled", e, c, [enc.tokens(["a red circle"])[0], None], enc.tokens(["circle"]), (null, floor))
    assert torch.allclose(got[1], clip_cosine(e[1:], c)[0])
    assert not torch.allclose(got[0], clip_cosine(e[:1], c)[0])


class _PooledEncoder:
    """A causal-like toy encoder: each word a fixed vector, the end token the sum of the words, so
    the calibrated metric's end-state cosines between one-word prompts are the words' cosines."""

    L, D = 8, 6

    def __init__(self, words: dict[str, list[float]]):
        self.words = {w: torch.tensor(v + [0.0] * (self.D - len(v))) for w, v in words.items()}
        self.ids_ = {w: i + 3 for i, w in enumerate(words)}

    def encode(self, texts):
        out = torch.zeros(len(texts), self.L, self.D)
        for b, t in enumerate(texts):
            ws = t.split()
            for i, w in enumerate(ws):
                out[b, 1 + i] = self.words[w]
            out[b, 1 + len(ws)] = sum((self.words[w] for w in ws), torch.zeros(self.D))
        return out

    def tokens(self, texts):
        return [tuple(self.ids_[w] for w in t.split()) for t in texts]


def _unit(cos: float, axis: int) -> list[float]:
    """A unit vector at cosine ``cos`` to e0, the rest along ``axis``."""
    v = [0.0] * 6
    v[0], v[axis] = cos, (1 - cos**2) ** 0.5
    return v


@pytest.mark.parametrize("slices, contrast, red_floor", [
    ([("red",), ("blue",)], True, 0.4),  # another slice's concept: red's floor is its similarity to blue
    ([("red",), ("blue",)], False, 0.0),  # contrast off: the reference floor alone
    ([("red", "blue")], True, 0.0),  # names of one slice never raise each other's floor
    ([("red",), ("crimson",)], True, 0.0),  # near-synonyms (cosine 0.8 >= the cap) do not either
    ([("red",)], True, 0.0),  # one concept: nothing to contrast with
])
def test_contrast_floor_against_the_other_slices_concepts(slices, contrast, red_floor):
    from lib_spm.runtime.gating import CONTRAST_CAP, ConceptGate

    assert 0.4 < CONTRAST_CAP <= 0.8
    enc = _PooledEncoder({"red": _unit(1.0, 1), "blue": _unit(0.4, 2), "yellow": _unit(0.4, 3),
                          "crimson": _unit(0.8, 4), "house": _unit(0.0, 5)})
    gate = ConceptGate(GateSettings(metric="pooled", reference_prompts=("house",), contrast=contrast), slices, enc)
    gate.prepare()
    floors = dict(zip(gate.concepts, gate.calibration[1].tolist()))
    assert floors["red"] == pytest.approx(red_floor, abs=1e-5)
    red = [i for i, s in enumerate(slices) if "red" in s][0]
    g = gate.gates(enc.encode(["red", "yellow"]), enc.tokens(["red", "yellow"]))[:, red]
    assert g[0] == pytest.approx(1.0)  # the concept itself always opens its gate fully
    # "yellow" is as close to red as blue is: it half-opens red's gate unless blue contrasts it away
    assert g[1] == pytest.approx(0.0 if red_floor else 0.4, abs=1e-5)
