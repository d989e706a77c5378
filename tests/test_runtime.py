"""One table of models through one suite of runtime invariants (STYLE.md, "Tests")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
from models import CTX, ToyEncoder, ldm_tree, tiny_sd1, tiny_sdxl
from spm_helpers import hook_counts, merged, merged_columns, published, random_spm
from torch.overrides import TorchFunctionMode

from lib_spm import ArchitectureMismatch, GateSettings, Session, SPMRuntimeError, UnresolvedKeysError
from lib_spm.format.metadata import Slice
from lib_spm.runtime.placement import placement

PROMPTS = ["a red circle", "a blue square on grass", "circle", "a photo of a dog"]
B = len(PROMPTS)


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    width: int  # text width the model reads
    extra: Callable[[int], dict]  # extra forward kwargs for a batch (seeded)
    dialect: str = "key"

    def inputs(self, batch: int = B, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 4, 8, 8, generator=g)
        t = torch.full((batch,), 500)
        enc = ToyEncoder(self.width)
        return x, t, enc.encode(PROMPTS[:batch]), enc

    def run(self, model, x, t, ctx, rows=slice(None)):
        kw = {k: v[rows] for k, v in self.extra(x.shape[0] if rows == slice(None) else B).items()}
        with torch.no_grad():
            out = model(x[rows], t[rows], ctx[rows], **kw)
        return out.sample if hasattr(out, "sample") else out


def _sdxl_extra(batch):
    g = torch.Generator().manual_seed(7)
    return {"added_cond_kwargs": _Rows({"text_embeds": torch.randn(batch, CTX, generator=g),
                                        "time_ids": torch.randn(batch, 6, generator=g)})}


class _Rows(dict):
    """A dict of per-row tensors that slices like one."""

    def __getitem__(self, key):
        if isinstance(key, slice):
            return _Rows({k: v[key] for k, v in self.items()})
        return super().__getitem__(key)


def _none(batch):
    return {}


CASES = [
    Case("sd1-conv-proj", lambda: tiny_sd1(False), CTX, _none),
    Case("sd1-linear-proj", lambda: tiny_sd1(True), CTX, _none),
    Case("sdxl", tiny_sdxl, CTX, _sdxl_extra),
    Case("ldm-sd15-fixture", lambda: ldm_tree("sd15"), 12, _none, dialect="ldm_key"),
    Case("ldm-sdxl-fixture", lambda: ldm_tree("sdxl"), 32, _none, dialect="ldm_key"),
]


def _rows(rows):
    return lambda n: rows


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request):
    return request.param


@pytest.fixture
def world(case):
    model = case.build()
    x, t, ctx, enc = case.inputs()
    spm_a = random_spm(model, ["circle"], rank=1, seed=1, dialect=case.dialect)
    spm_b = random_spm(model, ["square", "grass"], rank=2, alpha=1.0, seed=2, dialect=case.dialect, every=2)
    base = case.run(model, x, t, ctx)
    return model, x, t, ctx, enc, spm_a, spm_b, base


def _close(a, b, tol=2e-5):
    scale = b.abs().max().clamp_min(1.0)
    return (a - b).abs().max() <= tol * scale


def test_gate_zero_is_exactly_base(case, world):
    model, x, t, ctx, enc, a, b, base = world
    for gate in (GateSettings(factor=0.0), GateSettings(enabled=False)):
        strength = 0.0 if not gate.enabled else 1.0
        with Session(model, [(a, strength), (b, strength)], encoder=enc, gate=gate):
            out = case.run(model, x, t, ctx)
        assert torch.equal(out, base)


def test_gate_one_equals_merged_weights(case, world):
    model, x, t, ctx, enc, a, b, base = world
    with Session(model, [(a, 0.7)], gate=GateSettings(enabled=False)):
        out = case.run(model, x, t, ctx)
    ref = case.run(merged(model, [(a, 0.7)]), x, t, ctx)
    assert not torch.equal(out, base)
    assert _close(out, ref)


def test_n_spms_equal_sum_of_their_deltas(case, world):
    model, x, t, ctx, enc, a, b, base = world
    with Session(model, [(a, 1.0), (b, -0.5)], gate=GateSettings(enabled=False)) as s:
        out = case.run(model, x, t, ctx)
        layer = next(iter(s._layers.values()))
        assert layer.down.shape[0] == a.rank + b.rank  # one stacked product, not one per SPM
    ref = case.run(merged(model, [(a, 1.0), (b, -0.5)]), x, t, ctx)
    assert _close(out, ref)


def test_per_row_gates_equal_rows_run_one_by_one(case, world):
    model, x, t, ctx, enc, a, b, base = world
    rows = enc.tokens(PROMPTS)
    with Session(model, [(a, 1.0), (b, 0.8)], encoder=enc, row_tokens=_rows(rows)) as s:
        out = case.run(model, x, t, ctx)
        gates = s.last_gates.clone()
    assert gates.shape == (B, 2)
    assert len({tuple(r.tolist()) for r in gates}) > 1, "rows should get different gates"
    assert gates[2, 0] == 1.0 and gates[1, 1] == 1.0  # exact token matches open the gate fully
    for i in range(B):
        ref_model = merged(model, [(a, float(gates[i, 0]) * 1.0), (b, float(gates[i, 1]) * 0.8)])
        ref = case.run(ref_model, x, t, ctx, rows=slice(i, i + 1))
        assert _close(out[i : i + 1], ref), f"row {i}"


def test_slices_of_one_pack_are_gated_separately(case, world):
    model, x, t, ctx, enc, a, b, base = world
    pack = random_spm(model, ["circle", "square"], rank=2, seed=5, dialect=case.dialect,
                      slices=[Slice("c", ("circle",), 1), Slice("s", ("square",), 1)])
    rows = enc.tokens(PROMPTS)
    with Session(model, [(pack, 1.0)], encoder=enc, row_tokens=_rows(rows)) as s:
        out = case.run(model, x, t, ctx)
        gates = s.last_gates.clone()
    assert s.slice_labels == [f"{pack.name}:c", f"{pack.name}:s"]
    for i in range(B):
        ref = case.run(merged_columns(model, pack, gates[i]), x, t, ctx, rows=slice(i, i + 1))
        assert _close(out[i : i + 1], ref), f"row {i}"


def test_detach_is_bit_exact_and_leaves_no_hooks(case, world):
    model, x, t, ctx, enc, a, b, base = world
    before = hook_counts(model)
    s = Session(model, [(a, 1.0), (b, 1.0)], encoder=enc).attach()
    assert hook_counts(model) > before
    case.run(model, x, t, ctx)
    s.detach()
    assert hook_counts(model) == before
    assert torch.equal(case.run(model, x, t, ctx), base)
    assert not any(k.startswith("spm") or "session" in k for m in model.modules() for k in vars(m))


def test_composes_with_other_hooks_and_weight_patches(case, world):
    """Next to another extension's forward hook and the built-in Lora's in-place weight edits."""
    model, x, t, ctx, enc, a, b, base = world
    path = placement(a, model).layers[0].path
    layer = model.get_submodule(path)
    other = layer.register_forward_hook(lambda m, i, o: o + 0.25)
    with torch.no_grad():
        layer.weight += 0.01  # what the built-in Lora does to a layer's weight
    try:
        with Session(model, [(a, 1.0)], gate=GateSettings(enabled=False)):
            assert len(layer._forward_hooks) == 2
            out = case.run(model, x, t, ctx)
        ref = case.run(merged(model, [(a, 1.0)]), x, t, ctx)  # the copy keeps the other hook
        assert len(layer._forward_hooks) == 1
        assert _close(out, ref)
    finally:
        other.remove()
        with torch.no_grad():
            layer.weight -= 0.01
    assert torch.allclose(case.run(model, x, t, ctx), base, atol=1e-5)


def test_runtime_is_linear_where_the_published_arithmetic_squares_the_gate():
    """The published code computes scale * (sum_i c_i U_i)(sum_j c_j D_j): gamma^2 for one SPM and
    cross terms for several. The runtime agrees with it only at coefficient 1 for a single SPM."""
    model = tiny_sd1(True)
    case = CASES[1]
    x, t, ctx, enc = case.inputs()
    a = random_spm(model, ["circle"], rank=1, seed=1)
    b = random_spm(model, ["square"], rank=1, seed=2)
    # the reference is what the published code computes: c^2 for one SPM
    assert _close(case.run(published(model, [(a, 0.6)]), x, t, ctx), case.run(merged(model, [(a, 0.36)]), x, t, ctx))
    with Session(model, [(a, 1.0)], gate=GateSettings(enabled=False)):
        one = case.run(model, x, t, ctx)
    assert _close(one, case.run(published(model, [(a, 1.0)]), x, t, ctx))
    with Session(model, [(a, 0.6), (b, 0.9)], gate=GateSettings(enabled=False)):
        out = case.run(model, x, t, ctx)
    assert _close(out, case.run(merged(model, [(a, 0.6), (b, 0.9)]), x, t, ctx))
    assert not _close(out, case.run(published(model, [(a, 0.6), (b, 0.9)]), x, t, ctx), tol=1e-3)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_low_precision_model_with_fp32_spm(dtype, tol):
    model = tiny_sd1(False)
    case = CASES[0]
    x, t, ctx, enc = case.inputs()
    a = random_spm(model, ["circle"], rank=2, seed=1)
    with Session(model, [(a, 1.0)], gate=GateSettings(enabled=False)):
        ref = case.run(model, x, t, ctx)
    model.to(dtype)
    with Session(model, [(a, 1.0)], gate=GateSettings(enabled=False)):
        out = case.run(model, x.to(dtype), t, ctx.to(dtype))
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()


def test_strength_is_linear_and_settable_while_attached():
    model, case = tiny_sd1(True), CASES[1]
    x, t, ctx, enc = case.inputs()
    a = random_spm(model, ["circle"], seed=3)
    base = case.run(model, x, t, ctx)
    strengths, outs = (2.0, -1.0, 0.0), []
    with Session(model, [(a, 1.0)], gate=GateSettings(enabled=False)) as s:
        for strength in strengths:
            s.set_strength(0, strength)
            outs.append(case.run(model, x, t, ctx))
    for strength, out in zip(strengths, outs):  # W + s * delta: linear in s, never s**2
        assert _close(out, case.run(merged(model, [(a, strength)]), x, t, ctx))
    assert torch.equal(outs[-1], base)
    with pytest.raises(Exception, match="finite"):
        Session(model, [(a, float("nan"))], gate=GateSettings(enabled=False))


def test_failed_attach_leaves_no_hooks():
    model = tiny_sd1(False)
    good = random_spm(model, ["circle"], seed=1)
    other = random_spm(tiny_sdxl(), ["square"], seed=2)  # keys of another architecture
    before = hook_counts(model)
    with pytest.raises(UnresolvedKeysError) as e:
        Session(model, [(good, 1.0), (other, 1.0)], gate=GateSettings(enabled=False)).attach()
    assert e.value.keys and all(k.startswith("lora_unet_") for k in e.value.keys)
    assert hook_counts(model) == before
    wide = random_spm(tiny_sd1(False), ["circle"], seed=1)
    for lw in wide.layers.values():  # same names, wrong widths: an SDXL SPM on an SD1 model
        lw.down = torch.zeros(lw.down.shape[0], lw.down.shape[1] * 2, *lw.down.shape[2:])
    with pytest.raises(ArchitectureMismatch):
        Session(model, [(wide, 1.0)], gate=GateSettings(enabled=False)).attach()
    assert hook_counts(model) == before


class _InterruptedLinear(nn.Linear):
    """A Linear whose ``register_forward_hook`` is hit by Ctrl-C: before it registers anything
    (``"before"``), after registering but before the handle reaches the caller (``"after"``), or
    not at all (``None``)."""

    when: str | None = "before"

    def register_forward_hook(self, hook, **kwargs):
        if self.when == "after":
            super().register_forward_hook(hook, **kwargs)
        if self.when is not None:
            raise KeyboardInterrupt
        return super().register_forward_hook(hook, **kwargs)


def _interrupt_at(model: nn.Module, index: int, when: str) -> _InterruptedLinear:
    """Swap the ``index``-th adapted Linear for an interrupted one with the same weights."""
    from lib_spm.format.names import spm_layer_paths

    path = [p for p in spm_layer_paths(model) if type(model.get_submodule(p)) is nn.Linear][index]
    old = model.get_submodule(path)
    new = _InterruptedLinear(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    new.when = when
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)
    return new


@pytest.mark.parametrize("when", ["before", "after"])
def test_interrupted_attach_leaves_nothing_acting(when):
    """A KeyboardInterrupt between two hook registrations removes the hooks already registered;
    one registered in the instant before its handle came back stays inert; outputs stay exact."""
    case = CASES[0]
    model = case.build()
    x, t, ctx, enc = case.inputs()
    spm = random_spm(model, ["circle"], seed=1)
    base = case.run(model, x, t, ctx)
    stuck = _interrupt_at(model, 3, when)  # hooks on the UNet and earlier layers exist by then
    session = Session(model, [(spm, 1.0)], gate=GateSettings(enabled=False))
    with pytest.raises(KeyboardInterrupt):
        session.attach()
    assert not session.attached
    assert hook_counts(model) == (1 if when == "after" else 0)  # only the handle never returned
    assert torch.equal(case.run(model, x, t, ctx), base)
    stuck.when = None  # the same session attaches cleanly afterwards, each layer adapted once
    with session:
        out = case.run(model, x, t, ctx)
    assert _close(out, case.run(merged(model, [(spm, 1.0)]), x, t, ctx))
    assert torch.equal(case.run(model, x, t, ctx), base)


def test_architecture_label_decides_when_the_model_is_a_known_arch():
    """An SDXL-labelled SPM on a model that reads 768-wide text (SD1) is refused by name;
    a tiny model of no known architecture is judged by shapes alone."""
    tiny = tiny_sd1(False)
    spm = random_spm(tiny, ["circle"])
    spm.metadata.arch = "sdxl"
    Session(tiny, [(spm, 1.0)], gate=GateSettings(enabled=False)).attach().detach()
    sd1_like = __import__("diffusers").UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=2,
    )
    spm = random_spm(sd1_like, ["circle"])
    spm.metadata.arch = "sdxl"
    with pytest.raises(ArchitectureMismatch, match="sdxl SPM; this UNet is sd1"):
        Session(sd1_like, [(spm, 1.0)], gate=GateSettings(enabled=False)).attach()
    assert hook_counts(sd1_like) == 0


def test_runtime_errors_are_loud():
    model, case = tiny_sd1(True), CASES[1]
    x, t, ctx, enc = case.inputs()
    a = random_spm(model, ["circle"])
    with Session(model, [(a, 1.0)], encoder=enc, row_tokens=lambda n: [None] * (n + 1)):
        with pytest.raises(SPMRuntimeError, match="rows"):
            case.run(model, x, t, ctx)
    with Session(model, [(a, 1.0)], encoder=enc) as s:
        module = model.get_submodule(s.layer_paths[0])
        assert isinstance(module, torch.nn.Linear)
        h = torch.randn(1, 3, module.in_features)
        with pytest.raises(SPMRuntimeError, match="outside"):
            module(h)
    # detached, the same layer runs again as the plain layer it was
    assert torch.equal(module(h), torch.nn.functional.linear(h, module.weight, module.bias))
    with pytest.raises(Exception, match="encoder"):
        Session(model, [(a, 1.0)])  # gating on but nothing to encode concepts with


# -- no host synchronisation in the per-layer hooks ------------------------------------------------

HOST_READS = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"}


class _HostReads(TorchFunctionMode):
    """Records every tensor operation that reads values back to the host (a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        to_host = name == "to" and args[0].device.type != "cpu" and any(
            str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))  # CPU to CPU copies nothing
        if name in HOST_READS or to_host:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("metric", ["pooled_tokenuni", "clipcos_tokenuni"])
def test_layer_hooks_never_read_tensor_values(case, world, metric):
    """Around the session's hook on every adapted layer (a hook before it and one after it), no
    tensor value is read by the host: the per-layer work only indexes and multiplies."""
    model, x, t, ctx, enc, a, b, base = world
    rows = enc.tokens(PROMPTS)
    rows[3] = None  # one row of unknown text: the gate falls back to the cosine
    mode = _HostReads()
    with Session(model, [(a, 1.0), (b, 0.8)], encoder=enc, row_tokens=_rows(rows),
                 gate=GateSettings(metric=metric)) as s:
        handles = []
        for path in s.layer_paths:
            m = model.get_submodule(path)
            handles.append(m.register_forward_hook(lambda *_: mode.__enter__() and None, prepend=True))
            handles.append(m.register_forward_hook(lambda *_: mode.__exit__(None, None, None)))
        try:
            out = case.run(model, x, t, ctx)
        finally:
            for h in handles:
                h.remove()
        probe = _HostReads()
        with probe:
            bool(out.any())  # the detector itself sees a host read
    assert probe.seen == ["__bool__"]
    assert mode.seen == [], f"per-layer hooks read tensor values: {mode.seen}"
    assert not torch.equal(out, base)


@pytest.mark.parametrize("metric", ["pooled_tokenuni", "clipcos_tokenuni"])
def test_a_whole_gated_unet_call_runs_where_values_cannot_be_read(case, metric):
    """On the meta device every host read (``bool``, ``.item()``, ``.cpu()``) raises: gating and
    the layer hooks of a full UNet call run there, so none of them waits for the device."""
    model = case.build()
    x, t, ctx, enc = case.inputs()
    spm = random_spm(model, ["circle"], rank=2, seed=1, dialect=case.dialect)
    rows = enc.tokens(PROMPTS)
    rows[3] = None
    shape = case.run(model, x, t, ctx).shape
    model.to("meta")
    with pytest.raises(Exception):
        bool(torch.ones(1, device="meta").any())
    with Session(model, [(spm, 1.0)], encoder=enc, row_tokens=_rows(rows), gate=GateSettings(metric=metric)) as s:
        kw = {k: {n: v.to("meta") for n, v in d.items()} for k, d in case.extra(B).items()}
        with torch.no_grad():
            out = model(x.to("meta"), t.to("meta"), ctx.to("meta"), **kw)
        out = out.sample if hasattr(out, "sample") else out
        assert s.last_gates.device.type == "meta" and s.last_gates.shape == (B, 1)
    assert out.device.type == "meta" and out.shape == shape


def _counting_in_place(monkeypatch) -> list:
    from lib_spm.runtime import functional

    calls, real = [], functional.add_lowrank_bypass_
    monkeypatch.setattr(functional, "add_lowrank_bypass_", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("other", ["none", "hook ahead of ours", "global hook", "grad"])
def test_in_place_add_only_into_outputs_nobody_else_has_seen(case, world, monkeypatch, other):
    """The runtime adds into a Linear layer's output in place (one fused product) only when no other
    hook has seen that output; otherwise it adds out of place. Both give the same numbers, and a
    tensor another hook kept is never changed."""
    model, x, t, ctx, enc, a, b, base = world
    with Session(model, [(a, 0.8), (b, 1.0)], encoder=enc):
        ref = case.run(model, x, t, ctx)  # the plain run: in place where it may
    calls = _counting_in_place(monkeypatch)
    kept, handles = [], []
    with Session(model, [(a, 0.8), (b, 1.0)], encoder=enc) as s:
        if other == "hook ahead of ours":
            for p in s.layer_paths:
                handles.append(model.get_submodule(p).register_forward_hook(
                    lambda m, i, o: kept.append((o, o.clone())) and None, prepend=True))
        elif other == "global hook":
            handles.append(nn.modules.module.register_module_forward_hook(lambda m, i, o: None))
        try:
            if other == "grad":
                kw = {k: v for k, v in case.extra(x.shape[0]).items()}
                out = model(x, t, ctx, **kw)
                out = out.sample if hasattr(out, "sample") else out
                out.sum().backward()  # autograd is intact: nothing it saved was changed under it
                model.zero_grad(set_to_none=True)
                out = out.detach()
            else:
                out = case.run(model, x, t, ctx)
        finally:
            for h in handles:
                h.remove()
    assert _close(out, ref)
    linear_layers = any(isinstance(model.get_submodule(p), nn.Linear) for p in placement(a, model).paths.values())
    if other == "none":
        assert (len(calls) > 0) == linear_layers
    else:
        assert calls == []
    assert kept == [] or all(torch.equal(o, c) for o, c in kept)
    assert len(kept) > 0 or other != "hook ahead of ours"


def test_bench_runtime_times_sessions_whose_gates_are_open():
    """`bench runtime` must time the SPMs' work, not a closed gate skipping it: every gate is open
    in every configuration, and the out-of-place configuration is the same SPMs."""
    from lib_spm.tools.bench import bench_runtime

    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
               norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CTX, attention_head_dim=2)
    r = bench_runtime("sd1", latent=8, batch=2, rounds=2, counts=(1, 3), config=cfg)
    assert set(r["median_seconds"]) == {"0", "1", "3", "3 out of place"}
    assert r["gate_min"] == {"1": 1.0, "3": 1.0, "3 out of place": 1.0}
    assert all(v > 0 for v in r["paired_ratio"].values())
    assert set(r["in_call_ratio"]) == {"1", "3", "3 out of place"} and all(v > 1 for v in r["in_call_ratio"].values())
