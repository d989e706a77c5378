"""LocalHost, the standalone tab's host on the shapes world, and the ``ui`` command's arguments."""

from __future__ import annotations

import threading

import pytest
import torch

from lib_spm.tools.cli import build_parser
from lib_spm.ui.local import LocalHost


def test_job_slot_is_exclusive_and_clears_an_old_interrupt(tmp_path):
    host = LocalHost(tmp_path / "spm")
    host.interrupt()
    assert host.interrupted()
    entered = threading.Event()

    def second():
        with host.job("second"):
            entered.set()

    with host.job("first"):
        assert not host.interrupted()  # a new job starts uninterrupted
        t = threading.Thread(target=second)
        t.start()
        t.join(0.3)
        assert not entered.is_set()  # the second job waits for the slot
    t.join(5)
    assert entered.is_set()


def test_checkpoints_are_the_safetensors_of_the_folder(tmp_path):
    host = LocalHost(tmp_path / "spm", checkpoint_dir=tmp_path / "ckpt")
    assert host.checkpoints() == {} and host.loaded_checkpoint() is None
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "b.safetensors").write_bytes(b"")
    (tmp_path / "ckpt" / "a.safetensors").write_bytes(b"")
    (tmp_path / "ckpt" / "notes.txt").write_text("")
    assert list(host.checkpoints()) == ["a.safetensors", "b.safetensors"]
    assert host.checkpoint_dir() == tmp_path / "ckpt"
    assert LocalHost(tmp_path / "spm").checkpoint_dir() == tmp_path / "spm" / "checkpoints"


def test_backend_is_the_world_with_previews(tmp_path):
    host = LocalHost(tmp_path / "spm")
    backend = host.backend(512)
    assert backend.latent_shape == (12, 16, 16) and host.model_arch() is None
    img = backend.decode(torch.zeros(1, 12, 16, 16))
    assert img.shape == (1, 3, 32, 32) and torch.allclose(img, torch.full_like(img, 0.5))
    assert host.backend(32).unet is backend.unet  # the world is loaded once


def test_ui_command_arguments():
    args = build_parser().parse_args(["ui", "--spm-dir", "x", "--port", "9000"])
    assert (args.spm_dir, args.port, args.host, args.checkpoint_dir) == ("x", 9000, "127.0.0.1", None)


def test_ui_command_without_gradio_says_where_it_is(tmp_path, capsys):
    import importlib.util

    from lib_spm.tools.cli import main

    if importlib.util.find_spec("gradio") is not None:
        pytest.skip("gradio is installed here: the command would serve")
    assert main(["ui", "--spm-dir", str(tmp_path / "spm")]) == 2
    assert ".venv-ui" in capsys.readouterr().err
