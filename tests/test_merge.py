"""Merging: exact packs equal side-by-side application; compression reports its true error;
baking equals runtime application at gate 1; bad merges are refused before anything is written."""

from __future__ import annotations

import pytest
import torch
from models import ToyEncoder, tiny_sd1
from spm_helpers import merged, random_spm

from lib_spm import ArchitectureMismatch, GateSettings, Session, SPMShapeError, SPMValueError, load_spm
from lib_spm.format.metadata import SPMMetadata
from lib_spm.format.spm_file import LayerWeights, SPMFile
from lib_spm.operations.merge import bake_diffusers_folder, bake_ldm_checkpoint, extract, merge_compressed, merge_exact

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
    from lib_spm.format import archs
    from lib_spm.format.names import layer_names, spm_layer_paths

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
    from lib_spm.format.safetensors_io import read_file, write_file

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


# -- bake: real checkpoints, streaming, files it does not own -------------------------------------

def _with_non_floats(ckpt: dict) -> dict:
    """What real checkpoints carry besides float weights (int64 position_ids above all)."""
    g = torch.Generator().manual_seed(5)
    return {**ckpt,
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).reshape(1, 77),
            "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32),
            "model_ema.decay": torch.tensor(0.9999),
            "spm_test.mask": torch.rand(7, 5, generator=g) < 0.5,
            "spm_test.codes": torch.randint(-100, 100, (3, 4), generator=g, dtype=torch.int8),
            "first_stage_model.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16)}


def test_bake_copies_non_float_tensors_unchanged_and_bakes_weights_as_before(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    spm, ckpt = _sd1_subset_spm()
    full = _with_non_floats(ckpt)
    src = tmp_path / "model.safetensors"
    save_file(full, str(src), {"note": "kept"})
    before = src.read_bytes()
    rep = bake_ldm_checkpoint(src, tmp_path / "baked.safetensors", [(spm, 0.5)])
    out = load_file(str(tmp_path / "baked.safetensors"))
    with safe_open(str(tmp_path / "baked.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "kept"}
    assert set(out) == set(full) and rep["layers"] == 3 and src.read_bytes() == before
    baked = [k for k in ckpt if k.endswith(".weight")]
    for key in full:
        assert out[key].dtype == full[key].dtype and out[key].shape == full[key].shape
        if key not in baked:
            assert torch.equal(out[key], full[key])  # copied as it was, whatever its dtype
    for key, lw in zip(baked, spm.layers.values()):  # the old (read-all) bake's formula, bit for bit
        assert torch.equal(out[key], (ckpt[key].float() + 0.5 * lw.delta()).half())
    assert rep["max_abs_delta"] == pytest.approx(max(0.5 * float(lw.delta().abs().max()) for lw in spm.layers.values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baked.safetensors", "model.safetensors"]
    assert (tmp_path / "baked.safetensors").stat().st_mode == src.stat().st_mode  # not a private 0600


def test_bake_refuses_what_it_cannot_stream_before_writing(tmp_path):
    import os

    from safetensors.torch import save_file

    from lib_spm.errors import SPMFormatError

    spm, ckpt = _sd1_subset_spm()
    key = next(k for k in ckpt if k.endswith(".weight"))
    save_file({**ckpt, key: ckpt[key].to(torch.int16)}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(ArchitectureMismatch, match="I16, not float weights"):
        bake_ldm_checkpoint(tmp_path / "ints.safetensors", tmp_path / "o.safetensors", [(spm, 1.0)])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"[" * 16)
    with pytest.raises(SPMFormatError, match="not valid JSON"):
        bake_ldm_checkpoint(tmp_path / "junk.safetensors", tmp_path / "o.safetensors", [(spm, 1.0)])
    if hasattr(os, "mkfifo"):  # a FIFO is refused without waiting for a writer
        os.mkfifo(tmp_path / "fifo.safetensors")
        with pytest.raises(SPMFormatError, match="not a regular file"):
            bake_ldm_checkpoint(tmp_path / "fifo.safetensors", tmp_path / "o.safetensors", [(spm, 1.0)])
    assert not (tmp_path / "o.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _temp(folder, dest: str, pid: int, age_s: float, tag: str = "abcd_123"):
    import os
    import time

    from lib_spm.operations import tempfiles

    path = folder / f".{dest}.{pid}-{tag}{tempfiles.SUFFIX}"
    path.write_bytes(b"x" * 64)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


DEAD = 999_999_999  # above any pid_max (Linux allows at most 2**22): no process has this id


def test_next_write_cleans_only_its_own_stale_temporaries(tmp_path):
    import os

    from safetensors.torch import save_file

    from lib_spm.operations import tempfiles

    spm, ckpt = _sd1_subset_spm()
    save_file(ckpt, str(tmp_path / "model.safetensors"))
    name = "baked.safetensors"
    stale = _temp(tmp_path, name, DEAD, 120)  # its writer is gone and it sat for two minutes
    abandoned = _temp(tmp_path, name, os.getpid(), 2 * 86400)  # a day old: the pid says nothing any more
    kept = [_temp(tmp_path, name, DEAD, 5, "fresh000"),  # within the grace: maybe a writer in another PID namespace
            _temp(tmp_path, name, os.getpid(), 3600, "alive000"),  # its writer (this process) is alive
            _temp(tmp_path, "other.safetensors", DEAD, 120)]  # another destination's
    users = [tmp_path / f".{name}.abcd1234.tmp", tmp_path / f".{name}.1-abcd1234{tempfiles.SUFFIX}.keep",
             tmp_path / f"{name}.1-abcd1234{tempfiles.SUFFIX}", tmp_path / f".{name}.1-abcd12345{tempfiles.SUFFIX}"]
    for u in users:
        u.write_text("a user's file")
        os.utime(u, (0, 0))
    bake_ldm_checkpoint(tmp_path / "model.safetensors", tmp_path / name, [(spm, 1.0)])
    assert not stale.exists() and not abandoned.exists()
    assert all(p.exists() for p in kept + users)
    assert tempfiles.clean_stale(tmp_path) == [kept[2]]  # what the folder listing would call
    spm_stale = _temp(tmp_path, "x.safetensors", DEAD, 120)  # SPM saves clean their own the same way
    spm.save(tmp_path / "x.safetensors")
    assert not spm_stale.exists() and all(p.exists() for p in kept[:2] + users)


@pytest.mark.skipif(__import__("os").name != "posix", reason="kill -9 is POSIX")
def test_a_write_killed_midway_leaves_a_temporary_the_next_write_removes(tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from lib_spm.operations import tempfiles

    code = (
        "import sys\n"
        "from lib_spm.format.checkpoint_io import Planned, write_stream\n"
        "def stall(out):\n"
        "    out.write(bytes(4096)); out.flush(); print('writing', flush=True); sys.stdin.read()\n"
        "write_stream(sys.argv[1], [Planned('t', 'U8', (8192,), stall)], None)\n")
    dst = tmp_path / "baked.safetensors"
    child = subprocess.Popen([sys.executable, "-c", code, str(dst)], cwd=Path(__file__).resolve().parents[1],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        child.kill()
        child.wait()
    (left,) = [p for p in tmp_path.iterdir() if tempfiles.owner(p.name)]
    assert tempfiles.owner(left.name) == (dst.name, child.pid) and not dst.exists()
    assert tempfiles.clean_stale_for(dst) == []  # fresh: left for the grace period
    os.utime(left, (time.time() - 2 * tempfiles.GRACE_S,) * 2)
    spm, ckpt = _sd1_subset_spm()
    save_file(ckpt, str(tmp_path / "model.safetensors"))
    bake_ldm_checkpoint(tmp_path / "model.safetensors", dst, [(spm, 1.0)])
    assert not left.exists() and set(load_file(str(dst))) == set(ckpt)


def test_bake_diffusers_folder_touches_nothing_it_did_not_create(world, tmp_path):
    import os

    from spm_helpers import random_spm

    model, enc, (a, b, c), x, t, ctx = world
    src = tmp_path / "src"
    model.save_pretrained(src / "unet", safe_serialization=True)
    (src / "vae").mkdir()
    (src / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae weights")  # same name, other folder
    (src / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"an unbaked copy")
    user = tmp_path / "baked.partial"  # the old temporary's name, now a user's folder
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    listing = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    rep = bake_diffusers_folder(src, tmp_path / "baked", [(a, 1.0)])
    assert (user / "notes.txt").read_text() == "mine"
    assert (tmp_path / "baked" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == b"vae weights"
    assert rep["not_copied"] == ["unet/diffusion_pytorch_model.bin"]
    assert not (tmp_path / "baked" / "unet" / "diffusion_pytorch_model.bin").exists()
    assert sorted(os.listdir(tmp_path)) == ["baked", "baked.partial", "src"]
    for inside in (src / "copy", src / "unet" / "copy"):  # would copy itself until ENAMETOOLONG
        with pytest.raises(SPMValueError, match="inside the source"):
            bake_diffusers_folder(src, inside, [(a, 1.0)])
    huge = random_spm(model, ["x"], std=1e20)  # its delta overflows: the bake fails midway
    with pytest.raises(SPMValueError, match="non-finite"):
        bake_diffusers_folder(src, tmp_path / "failed", [(huge, 1.0)])
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*")) == listing
    assert sorted(os.listdir(tmp_path)) == ["baked", "baked.partial", "src"]


def test_merge_rank_is_capped_at_what_the_deltas_hold(world):
    model, enc, (a, b, c), x, t, ctx = world
    inputs = [(a, 1.0), (b, 0.5), (c, 2.0)]
    pack, rep = merge_compressed(inputs, rank=100_000)
    exact = merge_exact(inputs)
    true = max(min(lw.rank, lw.down[0].numel(), lw.out_features) for lw in exact.layers.values())
    assert rep.rank == pack.rank == true <= a.rank + b.rank + c.rank
    assert "more than the merged deltas have" in rep.note and f"wrote rank {true}" in rep.note
    same, rep2 = merge_compressed(inputs, rank=true)
    assert rep2.note == ""
    assert all(torch.equal(pack.layers[k].down, same.layers[k].down) for k in pack.layers)


def test_bake_memory_bench_runs_on_a_tiny_checkpoint(tmp_path):
    """The full benchmark (BENCHMARKS.md) on a slice of SD1.5: one transformer block of the UNet,
    the non-float tensors, baked in a child process."""
    from lib_spm.tools.bench_bake import bench_bake_memory, checkpoint_spec

    spec = [s for s in checkpoint_spec("sd1") if ".input_blocks.1." in s[0]
            or (s[1] is not None and not s[1].is_floating_point)]
    assert {"cond_stage_model.transformer.text_model.embeddings.position_ids", "spm_bench.bool_mask"} <= {
        s[0] for s in spec}
    res = bench_bake_memory("sd1", "fp16", spec=spec, workdir=str(tmp_path))
    assert res["layers_baked"] == 12  # proj_in, attn1 x4, attn2 x4, ff x2, proj_out
    assert res["checkpoint_gib"] == res["baked_gib"] > 0
    assert res["peak_rss_gib"] >= res["rss_before_bake_gib"] > 0
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone
