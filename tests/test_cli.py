"""``python -m lib_spm inspect``: real subprocesses on full-size zoo files, a tiny one and bad files.

Each subprocess costs seconds (torch, diffusers), so all of them are started at once in one
module fixture and the tests read their results.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import tiny_sd1

from lib_spm.format import archs
from lib_spm.format.zoo import write_zoo_file
from lib_spm.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["van gogh", "picasso"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    paths = {
        "sd1": d / "sd1 zoo.safetensors",  # a space in the name, as users' files have
        "sdxl": d / "sdxl_zoo.safetensors",
        "tiny": d / "tiny.safetensors",
        "garbage": d / "garbage.safetensors",
        "pickle": d / "pickle.safetensors",
    }
    write_zoo_file(paths["sd1"], archs.reference_unet("sd1"), PROMPTS, dtype=torch.float16)
    write_zoo_file(paths["sdxl"], archs.reference_unet("sdxl"), PROMPTS, alpha=0.5, dtype=torch.bfloat16)
    write_zoo_file(paths["tiny"], tiny_sd1(False), ["cat"], rank=2)
    paths["garbage"].write_bytes(bytes(range(256)) * 16)
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(3)}}, buf)
    paths["pickle"].write_bytes(buf.getvalue())
    return paths


@pytest.fixture(scope="module")
def runs(files):
    """Start every CLI call in parallel; return {name: CompletedProcess-like (rc, stdout, stderr)}."""
    calls = {
        "sd1_json": ["inspect", str(files["sd1"]), "--json"],
        "sd1_text": ["inspect", str(files["sd1"])],
        "sdxl_json": ["inspect", "--json", str(files["sdxl"])],
        "tiny_json": ["inspect", str(files["tiny"]), "--json"],
        "garbage": ["inspect", str(files["garbage"]), "--json"],
        "pickle": ["inspect", str(files["pickle"])],
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "lib_spm", *argv], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, argv in calls.items()
    }
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def _ok_json(run) -> dict:
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize(
    "run,kind,arch,layers,params,alpha,dtype",
    [
        ("sd1_json", "sd1", "sd1", 192, 423_936, 1.0, "float16"),
        ("sdxl_json", "sdxl", "sdxl", 722, 2_659_840, 0.5, "bfloat16"),
    ],
)
def test_inspect_json_full_size(runs, files, run, kind, arch, layers, params, alpha, dtype):
    info = _ok_json(runs[run])
    path = files[kind]
    assert info["architecture"] == arch
    assert info["format"] == "original model zoo"
    assert info["rank"] == 1
    assert info["alpha"] == alpha
    assert info["targets"] == PROMPTS
    assert info["layers"] == layers
    assert info["parameters"] == params
    assert info["dtype"] == dtype
    assert info["file"] == str(path)
    assert info["name"] == path.stem
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["slices"] == [{"name": path.stem, "concepts": PROMPTS, "rank": 1}]
    assert info["webui_builtin_lora"]["loads"] is True
    assert f"all {layers} layers" in info["webui_builtin_lora"]["detail"]


def test_inspect_text(runs):
    run = runs["sd1_text"]
    assert run.returncode == 0 and run.stderr == ""
    lines = {line.split("  ")[0].strip(): line.split("  ", 1)[1].strip() for line in run.stdout.splitlines()}
    assert lines["architecture"] == "sd1"
    assert lines["format"] == "original model zoo"
    assert lines["rank"] == "1"
    assert lines["parameters"] == "423936"
    assert json.loads(lines["targets"]) == PROMPTS
    assert lines["webui builtin lora"].startswith("yes (all 192 layers")


def test_inspect_tiny_model_file(runs, files):
    info = _ok_json(runs["tiny_json"])
    assert info["architecture"] == "unknown"
    assert info["rank"] == 2 and info["targets"] == ["cat"]
    assert info["format"] == "original model zoo"
    assert info["webui_builtin_lora"]["loads"] is False
    assert "architecture unknown" in info["webui_builtin_lora"]["detail"]


@pytest.mark.parametrize("run", ["garbage", "pickle"])
def test_inspect_bad_file(runs, files, run):
    r = runs[run]
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert files[run].name in lines[0]
    assert "Traceback" not in r.stderr


def test_main_in_process_missing_file(tmp_path, capsys):
    """The same contract without a subprocess: a missing file is one line and exit code 2."""
    code = main(["inspect", str(tmp_path / "missing.safetensors")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert "missing.safetensors" in captured.err


# -- merge / extract / bake, in process (every sub-command must at least parse and run) --------

def _tiny_files(tmp_path):
    from models import tiny_sd1

    from lib_spm.format.zoo import write_zoo_file

    unet = tiny_sd1(False)
    write_zoo_file(tmp_path / "a.safetensors", unet, ["circle"], rank=1, seed=1)
    write_zoo_file(tmp_path / "b.safetensors", unet, ["square"], rank=2, seed=2)
    return unet


def test_merge_extract_commands(tmp_path, capsys):
    import json as _json

    from lib_spm import load_spm
    from lib_spm.tools.cli import main

    _tiny_files(tmp_path)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert main(["merge", str(tmp_path / "p.safetensors"), a + ":1.0", b + ":0.5"]) == 0
    out = _json.loads(capsys.readouterr().out)
    assert out["rank"] == 3 and out["slices"] == ["a", "b"]
    assert main(["merge", str(tmp_path / "c.safetensors"), a, b, "--rank", "2", "--dtype", "fp16"]) == 0
    out = _json.loads(capsys.readouterr().out)
    assert out["rank"] == 2 and 0 < out["overall_relative_error"] < 1
    assert main(["extract", str(tmp_path / "p.safetensors"), "b", str(tmp_path / "x.safetensors")]) == 0
    assert load_spm(tmp_path / "x.safetensors").rank == 2
    assert main(["merge", str(tmp_path / "q.safetensors"), a + ":abc"]) == 2
    assert "must be a number" in capsys.readouterr().err


def test_merge_rank_is_capped_at_the_true_rank_with_a_note(tmp_path, capsys):
    """Rank-1 and rank-2 inputs hold at most rank 3: asking for 100000 writes rank 3, says so,
    and the file is the size of an honest rank-3 file (no zero padding)."""
    import json as _json

    from lib_spm import load_spm
    from lib_spm.tools.cli import main

    _tiny_files(tmp_path)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert main(["merge", str(tmp_path / "big.safetensors"), a, b, "--rank", "100000"]) == 0
    captured = capsys.readouterr()
    out = _json.loads(captured.out)
    assert out["rank"] == 3 and load_spm(tmp_path / "big.safetensors").rank == 3
    assert "note: rank 100000 is more than the merged deltas have: 3" in captured.err
    assert main(["merge", str(tmp_path / "r3.safetensors"), a, b, "--rank", "3"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert abs(out["bytes"] - (tmp_path / "r3.safetensors").stat().st_size) < 64  # names differ, tensors not


def test_bake_command_on_a_diffusers_folder(tmp_path, capsys):
    import json as _json

    from lib_spm.tools.cli import main

    unet = _tiny_files(tmp_path)
    unet.save_pretrained(tmp_path / "model" / "unet", safe_serialization=True)
    assert main(["bake", str(tmp_path / "model"), str(tmp_path / "baked"), str(tmp_path / "a.safetensors") + ":0.5"]) == 0
    assert _json.loads(capsys.readouterr().out)["layers"] > 0
    assert main(["bake", str(tmp_path / "model"), str(tmp_path / "baked"), str(tmp_path / "a.safetensors")]) == 2
    assert "exists" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    from lib_spm.tools.cli import build_parser

    parser = build_parser()
    for argv in (["inspect", "x"], ["merge", "o", "i"], ["extract", "p", "s", "o"], ["bake", "s", "d", "i"],
                 ["bench", "runtime"], ["bench", "erasure"], ["bench", "bake-memory", "--arch", "sdxl"], ["bench", "merge"], ["world", "train", "--out", "o"],
                 ["world", "classifier", "--out", "o"], ["world", "eval"], ["world", "release", "--from", "r",
                 "--classifier", "c"], ["demo"], ["train", "o.safetensors", "--target", "circle"]):
        assert callable(parser.parse_args(argv).run)


# -- hostile files: one error line, strict JSON, the ungated label ------------------------------

def _small(tmp_path, md: dict, name: str = "x.safetensors") -> Path:
    from safetensors.torch import save_file

    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    t = {f"{k}.lora_down.weight": torch.full((1, 768), 0.01), f"{k}.lora_up.weight": torch.full((320, 1), 0.01)}
    save_file(t, str(tmp_path / name), md)
    return tmp_path / name


@pytest.mark.parametrize("md", [
    {"prompts": "cat", "spm_format": "1", "spm_recipe": '{"lr": NaN}'},
    {"prompts": "cat", "spm_format": "1", "spm_targets": "[" * 1000 + "]" * 1000},
    {"prompts": "cat", "spm_format": "1", "spm_targets": '["\\ud800"]'},
    {"prompts": "cat", "rank": "1e400"},
    {"prompts": "cat", "rank": "9" * 4300},
], ids=["recipe_nan", "targets_bomb", "surrogate", "rank_1e400", "rank_4300_digits"])
@pytest.mark.parametrize("as_json", [True, False])
def test_inspect_hostile_metadata_is_one_error_line(tmp_path, capsys, md, as_json):
    path = _small(tmp_path, md)
    code = main(["inspect", str(path)] + (["--json"] if as_json else []))
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith("error: x.safetensors: "), out.err
    assert "Traceback" not in out.err and "unexpected" not in out.err


def test_inspect_shows_an_spm_without_targets_as_ungated(tmp_path, capsys):
    path = _small(tmp_path, {"prompts": ""})
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert info["targets"] == [] and info["ungated"] is True
    assert main(["inspect", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ", 1)[1].strip() for line in lines if line.startswith("targets ")] == [
        "(none — ungated: applies to every prompt)"]
    gated = _small(tmp_path, {"prompts": "cat"}, "y.safetensors")
    assert main(["inspect", str(gated), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ungated"] is False


@pytest.mark.parametrize("args,message", [
    (["--resolution", "100"], "multiple of 64"),
    (["--iterations", "0"], "iterations must be >= 1"),
    (["--max-denoising-steps", "1"], "max denoising steps >= 2"),
])
def test_bench_train_memory_refuses_bad_settings_before_building_anything(capsys, args, message):
    """The settings are checked in this process, before the child that builds a full-size UNet."""
    code = main(["bench", "train-memory", "--arch", "sd1", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err


def test_bench_train_memory_arguments_parse():
    from lib_spm.tools.bench_memory import check_args
    from lib_spm.tools.cli import build_parser

    a = build_parser().parse_args(["bench", "train-memory", "--arch", "sdxl", "--compare"])
    assert (a.arch, a.resolution, a.iterations, a.compare) == ("sdxl", None, 2, True)
    assert check_args("sdxl", a.resolution, a.iterations, a.max_denoising_steps, a.anchors) == 1024
    assert check_args("sd1", None, 1, 2, 0) == 512
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "train-memory", "--arch", "sd3"])


# -- train: an SPM on the shapes world, from the terminal -------------------------------------------

def test_train_command_takes_the_sampling_and_reports_passes(tmp_path, capsys):
    from lib_spm import load_spm
    from lib_spm.training.train_config import read_checkpoint

    out = tmp_path / "runs" / "no_circle.safetensors"
    argv = ["train", str(out), "--target", "circle", "--surrogate", "square", "--sampling", "pool",
            "--checkpoint-every", "2", "--seed", "1", "--iterations", "3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["steps"] == 3 and summary["sampling"] == "pool" and summary["anchors"] == 3  # pool's recipe
    assert summary["passes_per_iteration"] == summary["estimated_passes_per_iteration"]  # pool's count is exact
    assert "train no_circle (pool): 3/3" in captured.err  # progress on stderr, stdout stays JSON
    spm = load_spm(out)
    assert spm.metadata.recipe["sampling"] == "pool" and spm.metadata.surrogates == {"circle": "square"}
    cfg, step = read_checkpoint(out.with_name("no_circle.ckpt.safetensors"))
    assert cfg.sampling == "pool" and step == 3
    # the file exists: only --resume continues it, and only with the same settings
    assert main(argv) == 2 and "exists; choose another path" in capsys.readouterr().err
    other = [a if a != "pool" else "fresh" for a in argv] + ["--resume"]
    err = capsys.readouterr().err if main(other) == 2 else "ran"
    assert err == "error: checkpoint was made with other settings: anchors, sampling\n"  # fresh's 4 anchors too
    assert main([*argv[:-1], "4", "--resume"]) == 0  # 4 iterations: one more
    assert json.loads(capsys.readouterr().out)["steps"] == 4


@pytest.mark.parametrize("argv,message", [
    (["--sampling", "lazy"], "invalid choice: 'lazy'"),
    (["--surrogate", "a", "--surrogate", "b", "--surrogate", "c"], "one per target: 1 targets, 3 surrogates"),
    (["--iterations", "0"], "Iterations must be at least 1"),
    (["--resume"], "no checkpoint x.ckpt.safetensors"),
])
def test_train_command_refuses_bad_settings_in_one_line(tmp_path, capsys, argv, message):
    try:
        code = main(["train", str(tmp_path / "x.safetensors"), "--target", "circle", *argv])
        one_line = True
    except SystemExit as e:  # argparse's own refusal, under its usage line
        code, one_line = e.code, False
    err = capsys.readouterr().err
    assert code == 2 and message in err and not (tmp_path / "x.safetensors").exists()
    assert not one_line or (err.startswith("error: ") and err.count("\n") == 1)
