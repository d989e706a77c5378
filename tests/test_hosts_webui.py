"""The WebUI host against stand-ins that behave as the WebUI v1.10.1 does (no WebUI needed).

``cfg_step`` below batches rows the way ``CFGDenoiser.forward`` does (read from the WebUI's
source, written anew); each case also spells out the calls it must produce by hand.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from models import CTX, ToyEncoder, ldm_tree
from spm_helpers import random_spm

from lib_spm import GateSettings, Session, SPMRuntimeError, SPMShapeError
from lib_spm.hosts.webui.model import conditioning_of, unet_of
from lib_spm.hosts.webui.rows import CHUNK, PromptTokens, RowTexts, WebUIConcepts, WebUIRows, call_plans
from lib_spm.runtime import functional

ENC = ToyEncoder()
START, END = ToyEncoder.START, ToyEncoder.END
LONG = " ".join(f"w{i}" for i in range(100))  # 100 tokens: two chunks


# -- stand-ins --------------------------------------------------------------------------------

def _stub_parser():
    """The stand-in WebUI's ``modules.prompt_parser`` (tests/webui_stub), loaded on its own."""
    path = Path(__file__).resolve().parent / "webui_stub" / "modules" / "prompt_parser.py"
    spec = importlib.util.spec_from_file_location("stub_prompt_parser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FakeParser = _stub_parser()  # AND with :weight, [a:b:N] (N a step or a fraction of the steps)


class FakeCLIP:
    """cond_stage_model without process_texts: the fallback path (tokenize, 75-token chunks)."""

    def tokenize(self, texts):
        return [ENC.ids(t) for t in texts]


class FakeModel:
    """sd_model: get_learned_conditioning lays ToyEncoder vectors out in the WebUI's 77-token chunks."""

    def __init__(self, sdxl: bool = False, clip=None):
        self.sdxl = sdxl
        self.cond_stage_model = clip or FakeCLIP()
        self.cond_stage_key = "txt"
        self.model = SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1))

    @staticmethod
    def chunk_ids(text):
        ids = ENC.ids(text)
        parts = [ids[i : i + 75] for i in range(0, max(len(ids), 1), 75)]
        return [[START] + c + [END] * (76 - len(c)) for c in parts]

    def get_learned_conditioning(self, texts):
        chunks = [self.chunk_ids(t) for t in texts]
        k = max(len(c) for c in chunks)
        empty = [START] + [END] * 76
        rows = [sum((c + [empty] * (k - len(c))), []) for c in chunks]
        cond = torch.stack([torch.stack([ENC._vec(i) for i in r]) for r in rows])
        return {"crossattn": cond, "vector": torch.zeros(len(texts), 4)} if self.sdxl else cond


def opts(**kw):
    base = dict(batch_cond_uncond=True, pad_cond_uncond=False, pad_cond_uncond_v0=False, use_old_scheduling=False)
    return SimpleNamespace(**{**base, **kw})


def processing(model, prompts, negatives, steps=10, hires_steps=None):
    """A processing object after setup_conds: p.c / p.uc hold schedules as the WebUI builds them."""
    idx, flat, _ = FakeParser.get_multicond_prompt_list(prompts)
    sched = FakeParser.get_learned_conditioning_prompt_schedules

    def encoded(schedule):  # ``text`` is for the test's bookkeeping only
        return [SimpleNamespace(end_at_step=e, cond=model.get_learned_conditioning([t])[0], text=t)
                for e, t in schedule]

    flat_s = [encoded(s) for s in sched(flat, steps, hires_steps)]
    c = SimpleNamespace(batch=[[SimpleNamespace(schedules=flat_s[i], weight=w) for i, w in image] for image in idx])
    uc = [encoded(s) for s in sched(negatives, steps, hires_steps)]
    return SimpleNamespace(prompts=prompts, negative_prompts=negatives, steps=steps, firstpass_steps=steps,
                           is_hr_pass=False, get_conds=lambda: (c, uc))


def _stack(rows):
    """prompt_parser.stack_conds: shorter rows repeat their last vector."""
    T = max(r.shape[0] for r in rows)
    return torch.stack([torch.cat([r, r[-1:].repeat(T - r.shape[0], 1)]) for r in rows])


def cfg_step(model, rows, p, o, step, on_call, skip_uncond=False):
    """One ``CFGDenoiser.forward``: build cond/uncond rows, fire on_cfg_denoiser, make the UNet calls.

    ``on_call(context, true_texts)`` stands for one UNet call. Returns the true texts of every call.
    """
    c, uc = p.get_conds()

    def pick(schedule):
        return next((e for e in schedule if step <= e.end_at_step), schedule[0])

    cond_e = [pick(cp.schedules) for image in c.batch for cp in image]
    uncond_e = [pick(s) for s in uc]
    tensor, uncond = _stack([e.cond for e in cond_e]), _stack([e.cond for e in uncond_e])
    B, C = len(c.batch), len(cond_e)
    denoiser = SimpleNamespace(p=p, step=step, image_cfg_scale=None,
                               sampler=SimpleNamespace(sampler_extra_args={"cond": c, "uncond": uc}))
    rows.on_cfg_denoiser(SimpleNamespace(text_cond=tensor, text_uncond=uncond, denoiser=denoiser))
    truth = [e.text for e in cond_e] + [e.text for e in uncond_e]
    if o.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
        empty = model.get_learned_conditioning([""])
        n = (tensor.shape[1] - uncond.shape[1]) // CHUNK
        if n > 0:
            uncond = torch.cat([uncond, empty.repeat(B, n, 1)], dim=1)
        else:
            tensor = torch.cat([tensor, empty.repeat(C, -n, 1)], dim=1)
    calls = []

    def call(a, b, ctx):
        calls.append(truth[a:b])
        on_call(ctx, truth[a:b])

    if tensor.shape[1] == uncond.shape[1] or skip_uncond:
        cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
        if o.batch_cond_uncond:
            call(0, cond_in.shape[0], cond_in)
        else:
            for a in range(0, cond_in.shape[0], B):
                call(a, min(a + B, cond_in.shape[0]), cond_in[a : a + B])
    else:
        size = 2 * B if o.batch_cond_uncond else B
        for a in range(0, C, size):
            call(a, min(a + size, C), tensor[a : a + size])
        if not skip_uncond:
            call(C, C + B, uncond)
    return calls


def checking_call(rows, seen):
    """A UNet call as the Session makes it: conditioning first, then the row tokens."""
    def on_call(ctx, truth):
        rows.conditioning_of((), {"context": ctx})
        seen.append(rows(ctx.shape[0]))
    return on_call


# -- the row layout table -----------------------------------------------------------------------

@dataclass
class Case:
    name: str
    prompts: list
    negatives: list
    expected: list  # texts of every UNet call, in order
    o: dict = field(default_factory=dict)
    step: int = 1
    skip: bool = False


CASES = [
    Case("two-images", ["a cat", "a dog"], ["", ""], [["a cat", "a dog", "", ""]]),
    Case("and-weights", ["a cat AND a dog :0.5", "a bird"], ["ugly", "blurry"],
         [["a cat", " a dog", "a bird", "ugly", "blurry"]]),
    Case("negative-per-image", ["a cat", "a cat"], ["cat", "dog"], [["a cat", "a cat", "cat", "dog"]]),
    Case("negative-not-split", ["a cat"], ["ugly AND blurry"], [["a cat", "ugly AND blurry"]]),
    Case("split-calls", ["a cat AND a dog", "a bird"], ["n one", "n two"],
         [["a cat", " a dog"], ["a bird", "n one"], ["n two"]], o=dict(batch_cond_uncond=False)),
    Case("skip-uncond", ["a cat", "a dog"], ["n one", "n two"], [["a cat", "a dog"]], skip=True),
    Case("skip-uncond-split", ["a cat AND a dog", "a bird"], ["n one", "n two"],
         [["a cat", " a dog"], ["a bird"]], o=dict(batch_cond_uncond=False), skip=True),
    Case("unequal-lengths", [LONG, "a cat AND a dog AND a cow"], ["n one", "n two"],
         [[LONG, "a cat", " a dog", " a cow"], ["n one", "n two"]]),
    Case("unequal-lengths-split", [LONG, "a cat"], ["n one", "n two"],
         [[LONG, "a cat"], ["n one", "n two"]], o=dict(batch_cond_uncond=False)),
    Case("unequal-lengths-padded", [LONG], ["n one"], [[LONG, "n one"]], o=dict(pad_cond_uncond=True)),
    Case("editing-before", ["a [cat:dog:3]", "a cow"], ["", ""], [["a cat", "a cow", "", ""]], step=3),
    Case("editing-after", ["a [cat:dog:3]", "a cow"], ["", ""], [["a dog", "a cow", "", ""]], step=4),
    Case("editing-negative", ["a cow"], ["[ugly:blurry:2]"], [["a cow", "blurry"]], step=5),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rows_follow_the_cfg_denoiser(case):
    model, o = FakeModel(), opts(**case.o)
    rows = WebUIRows.for_model(model, opts=o, parser=FakeParser)
    p = processing(model, case.prompts, case.negatives)
    seen = []
    calls = cfg_step(model, rows, p, o, case.step, checking_call(rows, seen), skip_uncond=case.skip)
    assert calls == case.expected
    tok = PromptTokens(model)
    assert seen == [[tok.row(t) for t in call] for call in case.expected]


def test_and_weights_and_subprompt_texts():
    texts = RowTexts(["a cat AND a dog :0.5", "a bird"], ["", "x"], 10, parser=FakeParser)
    assert texts.weights() == [[1.0, 0.5], [1.0]]
    assert (texts.images, texts.cond_rows) == (2, 3)
    assert texts.rows(1) == ["a cat", " a dog", "a bird", "", "x"]
    assert texts.rows(1, edit=True) == ["a cat", " a dog", "a bird", "", "x", "", "x"]


def test_prompt_editing_switches_after_its_step():
    texts = RowTexts(["a [cat:dog:3] AND [red:blue:6]"], [""], 10, parser=FakeParser)
    assert [texts.cond(s) for s in (1, 3, 4, 6, 7, 10)] == [
        ["a cat", " red"], ["a cat", " red"], ["a dog", " red"], ["a dog", " red"], ["a dog", " blue"],
        ["a dog", " blue"]]
    assert texts.cond(11) == ["a cat", " red"]  # past the last entry the WebUI falls back to the first



# (prompt, base steps, hires steps, old scheduling) -> schedule, as v1.10.1's lark parser gives it
# (each case checked against that parser; the stand-in is written anew without lark)
@pytest.mark.parametrize("prompt,base,hires,old,schedule", [
    ("a [b:c:3] d", 10, None, False, [[3, "a b d"], [10, "a c d"]]),
    ("a [b:c:0.25] d", 10, None, False, [[2, "a b d"], [10, "a c d"]]),  # a fraction of the steps, truncated
    ("a [b:c: .5 ] d", 10, None, False, [[5, "a b d"], [10, "a c d"]]),
    ("a [b:c:3.0] d", 10, None, False, [[10, "a b d"]]),  # a decimal point makes it a fraction: 300%
    ("a [b:c:1.5] d", 10, 20, False, [[10, "a b d"], [20, "a c d"]]),  # hires: fractions count from 1.0
    ("a [b:c:12] d", 10, 20, False, [[2, "a b d"], [20, "a c d"]]),  # ... and steps from the first pass's
    ("a [b:c:0.5] d", 10, 20, False, [[20, "a c d"]]),  # switched during the first pass
    ("a [b:c:0.5] d", 10, 20, True, [[5, "a b d"], [10, "a c d"]]),  # old scheduling: no hires counting
    ("a [b:c:4] d", 10, 20, True, [[4, "a b d"], [10, "a c d"]]),
    ("[b:c:0.7] [d:e:4]", 10, None, False, [[4, "b d"], [7, "b e"], [10, "c e"]]),
])
def test_stand_in_parser_schedules_fractions_like_the_webui(prompt, base, hires, old, schedule):
    assert FakeParser.get_learned_conditioning_prompt_schedules([prompt], base, hires, old) == [schedule]


def test_prompt_editing_at_a_fraction_of_the_steps():
    texts = RowTexts(["a [cat:dog:0.3]"], ["[x:y:0.5]"], 10, parser=FakeParser)
    assert [texts.rows(s) for s in (3, 4, 5, 6)] == [["a cat", "x"], ["a dog", "x"], ["a dog", "x"], ["a dog", "y"]]


def test_call_plans():
    assert call_plans(3, 2, batch_cond_uncond=True, same_length=True) == [(5,), (3,)]
    assert call_plans(3, 2, batch_cond_uncond=False, same_length=True) == [(2, 2, 1), (2, 1)]
    assert call_plans(5, 2, batch_cond_uncond=True, same_length=False) == [(4, 1, 2), (5,)]
    assert call_plans(3, 2, batch_cond_uncond=False, same_length=False) == [(2, 1, 2), (2, 1)]
    assert call_plans(1, 1, batch_cond_uncond=True, same_length=True, edit=True) == [(3,)]
    assert call_plans(1, 1, batch_cond_uncond=True, same_length=False, edit=True) == []


def test_unknown_batch_size_gives_none_for_the_rest_of_the_step():
    rows = WebUIRows(lambda t: tuple(ENC.ids(t)))
    texts = ["a cat", "a dog", "n1", "n2"]
    rows.begin_step(texts, call_plans(2, 2, batch_cond_uncond=False, same_length=True))
    assert rows.next_call(3) is None
    assert rows.next_call(2) is None  # position is lost: never guess
    rows.begin_step(texts, call_plans(2, 2, batch_cond_uncond=False, same_length=True))
    assert rows.next_call(2) == ["a cat", "a dog"]
    assert rows.next_call(2) == ["n1", "n2"]
    assert rows.next_call(2) is None  # an extra call after the step's rows
    assert WebUIRows(lambda t: ()).next_call(1) is None  # no step begun


def test_conditioning_that_is_not_the_steps_rows_gives_none():
    model, o = FakeModel(), opts()
    rows = WebUIRows.for_model(model, opts=o, parser=FakeParser)
    p = processing(model, ["a cat", "a dog"], ["", ""])
    seen = []

    def swapped(ctx, truth):  # another extension's call of the same size with other rows
        rows.conditioning_of((), {"context": ctx.flip(0)})
        seen.append(rows(ctx.shape[0]))

    cfg_step(model, rows, p, o, 1, swapped)
    assert seen == [None]
    cfg_step(model, rows, p, o, 2, checking_call(rows, seen))  # the next step plans afresh
    assert seen[1] is not None and len(seen[1]) == 4


def test_prompts_that_do_not_match_the_conditioning_give_none():
    model, o = FakeModel(), opts()
    rows = WebUIRows.for_model(model, opts=o, parser=FakeParser)
    p = processing(model, ["a [cat:dog:3]"], [""])
    p.prompts = ["a cat"]  # not what the conditioning was made from: its schedule differs
    seen = []
    cfg_step(model, rows, p, o, 1, checking_call(rows, seen))
    assert seen == [None]


def test_hires_pass_uses_hires_prompts_and_steps():
    model, o = FakeModel(), opts()
    # the hires pass's conds: made from p.hr_prompts with (firstpass steps, hires steps)
    p = processing(model, ["a [cat:dog:14]"], ["n"], steps=10, hires_steps=20)
    p.is_hr_pass, p.hr_prompts, p.hr_negative_prompts = True, ["a [cat:dog:14]"], ["n"]
    p.prompts, p.negative_prompts = ["a cow"], ["m"]
    texts = RowTexts.from_processing(p, opts=o, parser=FakeParser)
    assert texts is not None and texts.rows(4) == ["a cat", "n"] and texts.rows(5) == ["a dog", "n"]
    p.is_hr_pass = False  # the first-pass prompts do not reproduce these schedules
    assert RowTexts.from_processing(p, opts=o, parser=FakeParser) is None


# -- tokens and the chunk layout ----------------------------------------------------------------

def test_long_prompt_tokens_and_chunk_layout():
    model = FakeModel()
    tok = PromptTokens(model)
    ids = ENC.ids(LONG)
    assert tok.tokens([LONG]) == [tuple(ids)] and tok.row(LONG) == tuple(ids)
    assert [len(c) for c in tok.chunks(LONG)] == [75, 25]
    cond = model.get_learned_conditioning([LONG])
    assert cond.shape == (1, 2 * CHUNK, CTX)
    # lib_spm.runtime.functional's layout: the end token of each chunk sits right after its prompt tokens
    ends = functional.end_states(cond, [len(tok.row(LONG))], CHUNK)[0]
    assert torch.equal(ends[0], ENC._vec(END)) and torch.equal(ends[1], ENC._vec(END))
    mask = functional.content_mask([len(ids)], cond.shape[1], CHUNK)[0]
    assert mask.sum() == 100 and not mask[0] and not mask[76] and not mask[77] and mask[78 + 24]


class ChunkingCLIP:
    """cond_stage_model with process_texts, chunking as sd_hijack_clip does: BREAK and comma
    backtracking (window 20) end a chunk early and pad it."""

    COMMA = 999

    def ids(self, text):
        return [self.COMMA if w == "," else i for w, i in zip(text.split(), ENC.ids(text))]

    def process_texts(self, texts):
        out = []
        for text in texts:
            chunks, cur, last_comma = [], [], -1

            def close():
                nonlocal cur, last_comma
                chunks.append(SimpleNamespace(tokens=[START] + cur + [END] * (75 - len(cur)) + [END]))
                cur, last_comma = [], -1

            for part_i, part in enumerate(text.split(" BREAK ")):
                if part_i:
                    close()
                for t in self.ids(part):
                    if t == self.COMMA:
                        last_comma = len(cur)
                    elif len(cur) == 75 and last_comma != -1 and 75 - last_comma <= 20:
                        moved = cur[last_comma + 1 :]
                        cur = cur[: last_comma + 1]
                        close()
                        cur = moved
                    if len(cur) == 75:
                        close()
                    cur.append(t)
            if cur or not chunks:
                close()
            out.append(chunks)
        return out, 0


def test_short_inner_chunks_keep_positions():
    clip = ChunkingCLIP()
    tok = PromptTokens(SimpleNamespace(cond_stage_model=clip))
    text = " ".join([f"a{i}" for i in range(69)] + [","] + [f"b{i}" for i in range(30)])  # comma at 70
    chunks = tok.chunks(text)
    assert [len(c) for c in chunks] == [70, 30]  # the WebUI moved 5 tokens to the next chunk
    assert tok.tokens([text]) == [tuple(clip.ids(text))]  # the prompt's tokens, in order
    row = tok.row(text)
    assert len(row) == 75 + 30 and row[70:75] == (END,) * 5
    # a conditioning whose vector at each position is that position's token id
    layout = sum((c.tokens for c in clip.process_texts([text])[0][0]), [])
    cond = torch.tensor(layout, dtype=torch.float32)[None, :, None].repeat(1, 1, 2)
    ends = functional.end_states(cond, [len(row)], CHUNK)[0, :, 0]
    assert ends.tolist() == [END, END]  # both chunks read at end/padding positions
    naive = functional.end_states(cond, [len(tok.tokens([text])[0])], CHUNK)[0, :, 0]
    assert naive[1] != END  # without filling, chunk 2 would be read at a prompt token
    b = tok.chunks("x y BREAK z")
    assert b == [tuple(ENC.ids("x y")), tuple(ENC.ids("z"))] and len(tok.row("x y BREAK z")) == 76


class HFTokenizer:
    all_special_ids = [START, END]

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([START] if add_special_tokens else []) + ENC.ids(text) + [END]}


def test_fallback_tokenizer_and_empty_prompt():
    tok = PromptTokens(FakeModel())
    assert tok.chunks("") == [()] and tok.row("") == ()
    tok2 = PromptTokens(SimpleNamespace(cond_stage_model=SimpleNamespace(tokenizer=HFTokenizer())))
    assert tok2.tokens(["a cat"]) == [tuple(ENC.ids("a cat"))]
    with pytest.raises(SPMRuntimeError):
        PromptTokens(SimpleNamespace())


# -- concepts, UNet ---------------------------------------------------------------------------

@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl-dict"])
def test_concept_encoder(sdxl):
    model = FakeModel(sdxl=sdxl)
    enc = WebUIConcepts(model)
    out = enc.encode(["cat", LONG])
    assert out.shape == (2, CHUNK, CTX)
    ref = model.get_learned_conditioning(["cat"])
    ref = ref["crossattn"] if sdxl else ref
    assert torch.equal(out[0], ref[0])
    assert enc.tokens(["a red cat", LONG]) == [tuple(ENC.ids("a red cat")), tuple(ENC.ids(LONG)[:75])]


def test_concept_encoder_rejects_short_encodings():
    model = SimpleNamespace(cond_stage_model=FakeCLIP(), get_learned_conditioning=lambda t: ENC.encode(t))
    with pytest.raises(SPMShapeError):
        WebUIConcepts(model).encode(["cat"])


def test_unet_and_conditioning_of():
    model = FakeModel()
    assert unet_of(model) is model.model.diffusion_model
    with pytest.raises(SPMRuntimeError):
        unet_of(SimpleNamespace())
    ctx = torch.zeros(2, CHUNK, CTX)
    x, t = torch.zeros(2, 4), torch.zeros(2)
    assert conditioning_of((x, t), {"context": ctx}) is ctx
    assert conditioning_of((x, t, ctx), {}) is ctx
    with pytest.raises(SPMRuntimeError):
        conditioning_of((x, t), {"context": None, "y": torch.zeros(2, 4)})


# -- end to end: a Session on the WebUI's LDM module tree -------------------------------------

SCENARIOS = [
    ("batched", {}, False),
    ("split", dict(batch_cond_uncond=False), False),
    ("skip-uncond", {}, True),
    ("unequal-split", dict(batch_cond_uncond=False), False),
]


@pytest.mark.parametrize("name,o,skip", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_session_gates_each_row_by_its_own_prompt(name, o, skip):
    model, o = FakeModel(), opts(**o)
    unet = ldm_tree("sd15")
    spm = random_spm(unet, ["cat"], seed=3, dialect="ldm_key")
    rows = WebUIRows.for_model(model, opts=o, parser=FakeParser)
    prompts = ["a [cat:dog:2] on grass", "a dog AND a red cat :0.7"]
    if name == "unequal-split":
        prompts[1] = LONG + " cat"
    p = processing(model, prompts, ["blurry", "cat"], steps=4)
    tok = PromptTokens(model)
    seen_gates = []
    with Session(unet, [(spm, 1.0)], encoder=WebUIConcepts(model), gate=GateSettings(metric="tokenuni"),
                 conditioning_of=rows.conditioning_of, row_tokens=rows) as s:

        def on_call(ctx, truth):
            g = torch.Generator().manual_seed(len(seen_gates))
            x = torch.randn(ctx.shape[0], 4, 8, 8, generator=g)
            with torch.no_grad():
                unet(x, torch.full((ctx.shape[0],), 500), context=ctx)
            for i, text in enumerate(truth):
                alone = s.gates(ctx[i : i + 1], [tok.row(text)])
                assert torch.equal(s.last_gates[i], alone[0]), (text, s.last_gates[i], alone[0])
                seen_gates.append((text, float(s.last_gates[i, 0])))

        for step in range(1, 5):
            cfg_step(model, rows, p, o, step, on_call, skip_uncond=skip)
    assert seen_gates
    for text, gate in seen_gates:
        assert gate == (1.0 if "cat" in text.split() else 0.0), (text, gate)
    assert {g for _, g in seen_gates} == {0.0, 1.0}
    assert ("a dog on grass", 0.0) in seen_gates and ("a cat on grass", 1.0) in seen_gates  # editing at step 2
