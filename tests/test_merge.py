"""Merging: exact packs equal side-by-side application; compression reports its true error;
baking equals runtime application at gate 1; bad merges are refused before anything is written."""

from __future__ import annotations

import pytest
import torch

from lib_spm import ArchitectureMismatch, GateSettings, Session, SPMShapeError, SPMValueError, load_spm
from lib_spm.merge import bake_diffusers_folder, bake_ldm_checkpoint, extract, merge_compressed, merge_exact
from lib_spm.metadata import SPMMetadata
from lib_spm.spm_file import LayerWeights, SPMFile
from models import ToyEncoder, tiny_sd1
from spm_helpers import merged, random_spm

PROMPTS = ["a red circle", "a blue square", "a triangle on grass", "a photo"]


@pytest.fixture(scope="module")
def world():
    model = tiny_sd1(False)
    enc = ToyEncoder()
    a = random_spm(model, ["circle"], rank=1, alpha=1.0, seed=1, name="a")
    b = random_spm(model, ["square", "grass"], rank=2, alpha=0.5, seed=2, name="b", every=2)
    c = random_spm(model, ["triangle"], rank=3, alpha=3.0, seed=3, name="c")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.full((4,), 300)
    return model, enc, [a, b, c], x, t, enc.encode(PROMPTS)


def run(model, x, t, ctx):
    with torch.no_grad():
        return model(x, t, ctx).sample


def close(a, b, tol=3e-5):
    return (a - b).abs().max() <= tol * b.abs().max().clamp_min(1.0)


def test_exact_pack_equals_side_by_side_with_ft(world):
    model, enc, (a, b, c), x, t, ctx = world
    weights = (1.0, 0.5, -0.7)
    pack = merge_exact(list(zip((a, b, c), weights)), name="pack")
    assert pack.rank == 6 and [s.rank for s in pack.slices()] == [1, 2, 3]
    rows = enc.tokens(PROMPTS)
    with Session(model, [(a, 0.8 * 1.0), (b, 0.8 * 0.5), (c, 0.8 * -0.7)], encoder=enc, row_tokens=lambda n: rows) as s:
        side = run(model, x, t, ctx)
        side_gates = s.last_gates.clone()
    with Session(model, [(pack, 0.8)], encoder=enc, row_tokens=lambda n: rows) as s:
        packed = run(model, x, t, ctx)
        assert torch.equal(s.last_gates, side_gates)  # every slice kept its own gate
    assert close(packed, side)


def test_exact_pack_is_a_plain_lora_linear_in_its_weights(world, tmp_path):
    model, enc, (a, b, c), x, t, ctx = world
    pack = merge_exact([(a, 2.0), (b, -1.0)])
    pack.save(tmp_path / "p.safetensors")
    loaded = load_spm(tmp_path / "p.safetensors")
    with Session(model, [(loaded, 1.0)], gate=GateSettings(enabled=False)):
        out = run(model, x, t, ctx)
    assert close(out, run(merged(model, [(a, 2.0), (b, -1.0)]), x, t, ctx))
    assert [s.name for s in loaded.slices()] == ["a", "b"]
    assert loaded.metadata.recipe["merge"]["inputs"][1]["weight"] == -1.0


def test_extract_gives_back_a_weighted_input(world):
    model, enc, (a, b, c), x, t, ctx = world
    pack = merge_exact([(a, 1.0), (b, 0.25), (c, 1.0)])
    got = extract(pack, "b")
    assert got.rank == 2 and got.metadata.targets == ["square", "grass"]
    with Session(model, [(got, 1.0)], gate=GateSettings(enabled=False)):
        out = run(model, x, t, ctx)
    assert close(out, run(merged(model, [(b, 0.25)]), x, t, ctx))
    with pytest.raises(SPMValueError, match="no slice"):
        extract(pack, "zzz")


def test_compressed_full_rank_is_exact_and_errors_are_true(world):
    model, enc, (a, b, c), x, t, ctx = world
    inputs = [(a, 1.0), (b, 0.5), (c, 1.0)]
    full, rep = merge_compressed(inputs, rank=6)
    assert rep.overall_error < 1e-5
    with Session(model, [(full, 1.0)], gate=GateSettings(enabled=False)):
        out = run(model, x, t, ctx)
    assert close(out, run(merged(model, inputs), x, t, ctx), tol=1e-4)
    small, rep2 = merge_compressed(inputs, rank=2)
    exact = merge_exact(inputs)
    num = den = 0.0
    for k, lw in exact.layers.items():
        d, approx = lw.delta(), small.layers[k].delta()
        err = float((d - approx).norm() / d.norm())
        assert abs(err - rep2.per_layer_error[k]) < 1e-4
        num, den = num + float((d - approx).norm() ** 2), den + float(d.norm() ** 2)
    assert abs(rep2.overall_error - (num / den) ** 0.5) < 1e-4 and rep2.overall_error > 0.05
    assert small.slices()[0].concepts == ("circle", "square", "grass", "triangle")
    assert "max over all concepts" in small.metadata.recipe["merge"]["gate"]


def test_error_budget_picks_the_smallest_sufficient_rank(world):
    model, enc, (a, b, c), *_ = world
    inputs = [(a, 1.0), (b, 0.5), (c, 1.0)]
    for budget in (0.5, 0.2, 0.0):
        pack, rep = merge_compressed(inputs, error_budget=budget)
        assert max(rep.per_layer_error.values()) <= budget + 1e-5
        if rep.rank > 1:
            _, lower = merge_compressed(inputs, rank=rep.rank - 1)
            assert max(lower.per_layer_error.values()) > budget


def test_bad_merges_are_refused(world):
    model, enc, (a, b, c), *_ = world
    xl = random_spm(tiny_sd1(False), ["x"], seed=9)
    xl.metadata.arch, a2 = "sdxl", random_spm(model, ["circle"])
    a2.metadata.arch = "sd1"
    with pytest.raises(ArchitectureMismatch):
        merge_exact([(a2, 1.0), (xl, 1.0)])
    wrong = random_spm(model, ["y"], seed=4)
    k = next(iter(wrong.layers))
    lw = wrong.layers[k]
    wrong.layers[k] = LayerWeights(torch.zeros(1, lw.in_features + 1, *lw.down.shape[2:]), lw.up, 1.0)
    with pytest.raises(SPMShapeError, match="cannot combine"):
        merge_exact([(a, 1.0), (wrong, 1.0)])
    for bad in ([], [(a, float("nan"))]):
        with pytest.raises(SPMValueError):
            merge_exact(bad)
    with pytest.raises(SPMValueError):
        merge_compressed([(a, 1.0)], rank=2, error_budget=0.1)


def test_bake_diffusers_folder_equals_runtime_at_gate_one(world, tmp_path):
    from diffusers import UNet2DConditionModel

    model, enc, (a, b, c), x, t, ctx = world
    (tmp_path / "src").mkdir()
    model.save_pretrained(tmp_path / "src" / "unet", safe_serialization=True)
    (tmp_path / "src" / "model_index.json").write_text("{}")
    before = (tmp_path / "src" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    rep = bake_diffusers_folder(tmp_path / "src", tmp_path / "baked", [(a, 1.0), (c, 0.5)])
    assert rep["layers"] == len(a.layers)
    baked = UNet2DConditionModel.from_pretrained(tmp_path / "baked" / "unet").eval()
    with Session(model, [(a, 1.0), (c, 0.5)], gate=GateSettings(enabled=False)):
        runtime = run(model, x, t, ctx)
    assert (run(baked, x, t, ctx) - runtime).abs().max() < 1e-4
    assert (tmp_path / "baked" / "model_index.json").exists()
    assert (tmp_path / "src" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    with pytest.raises(FileExistsError):
        bake_diffusers_folder(tmp_path / "src", tmp_path / "baked", [(a, 1.0)])


def _sd1_subset_spm(n_layers=3, scale=0.05, seed=0):
    """An sd1 SPM over a few full-size layers, and a matching slice of an LDM checkpoint."""
    from lib_spm import archs
    from lib_spm.names import layer_names, spm_layer_paths

    ref = archs.reference_unet("sd1")
    names = layer_names(ref)
    g = torch.Generator().manual_seed(seed)
    layers, ckpt = {}, {"model.diffusion_model.out.2.bias": torch.randn(4, generator=g).half()}
    for p in spm_layer_paths(ref)[:n_layers]:
        m = ref.get_submodule(p)
        w = tuple(m.weight.shape)
        layers[names[p].key] = LayerWeights(torch.randn(1, *w[1:], generator=g) * scale,
                                            torch.randn(w[0], 1, *([1, 1] if len(w) == 4 else []), generator=g) * scale, 1.0)
        ckpt[f"model.diffusion_model.{names[p].ldm}.weight"] = torch.randn(w, generator=g).half()
    return SPMFile(layers, SPMMetadata(targets=["x"], arch="sd1", name="x")), ckpt


def test_bake_ldm_checkpoint_adds_deltas_in_fp32_and_never_overwrites(tmp_path):
    from lib_spm.safetensors_io import read_file, write_file

    spm, ckpt = _sd1_subset_spm()
    src = write_file(tmp_path / "model.safetensors", ckpt, {"note": "kept"})
    before = src.read_bytes()
    rep = bake_ldm_checkpoint(src, tmp_path / "baked.safetensors", [(spm, 0.5)])
    out, md = read_file(tmp_path / "baked.safetensors")
    assert md == {"note": "kept"} and rep["layers"] == 3 and src.read_bytes() == before
    names = {k for k in ckpt if k.endswith(".weight")}
    deltas = [lw.delta() for lw in spm.layers.values()]
    for key, d in zip(sorted(names, key=list(ckpt).index), deltas):
        assert out[key].dtype == torch.float16
        assert torch.equal(out[key], (ckpt[key].float() + 0.5 * d).half())
    assert torch.equal(out["model.diffusion_model.out.2.bias"], ckpt["model.diffusion_model.out.2.bias"])
    with pytest.raises(SPMValueError, match="never overwrites"):
        bake_ldm_checkpoint(src, src, [(spm, 1.0)])
    with pytest.raises(FileExistsError):
        bake_ldm_checkpoint(src, tmp_path / "baked.safetensors", [(spm, 1.0)])
    huge, _ = _sd1_subset_spm(scale=1e4)
    with pytest.raises(SPMValueError, match="non-finite"):
        bake_ldm_checkpoint(src, tmp_path / "inf.safetensors", [(huge, 1.0)])
    assert not (tmp_path / "inf.safetensors").exists()
    del ckpt[next(k for k in ckpt if k.endswith(".weight"))]
    write_file(tmp_path / "other.safetensors", ckpt, {})
    with pytest.raises(ArchitectureMismatch, match="not an sd1 checkpoint"):
        bake_ldm_checkpoint(tmp_path / "other.safetensors", tmp_path / "o.safetensors", [(spm, 1.0)])
