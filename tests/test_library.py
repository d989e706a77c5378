"""The SPM folder: hostile names, links leading out, sidecars on rename/delete, byte-exact and
atomic metadata edits, bad files in the listing, and the per-file cache."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lib_spm import library
from lib_spm.errors import ArchitectureMismatch, SPMKeyError, SPMValueError
from lib_spm.library import SPMLibrary, check_name
from lib_spm.metadata import SPMMetadata, Slice
from lib_spm.safetensors_io import read_file, read_header, write_file
from lib_spm.spm_file import LayerWeights, SPMFile, file_sha256
from models import tiny_sd1
from spm_helpers import random_spm

TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture(scope="module")
def unet():
    return tiny_sd1()


@pytest.fixture
def lib(tmp_path) -> SPMLibrary:
    return SPMLibrary(tmp_path / "spm")


def arch_spm(dim: int, targets=("van gogh",), seed=0) -> SPMFile:
    """A one-layer SPM whose cross-attention width says its architecture (768 sd1, 2048 sdxl)."""
    g = torch.Generator().manual_seed(seed)
    layer = LayerWeights(torch.randn(1, dim, generator=g), torch.randn(320, 1, generator=g), 1.0)
    return SPMFile({TO_K: layer}, SPMMetadata(targets=list(targets), rank=1, alpha=1.0))


def tree(root: Path) -> dict[str, bytes]:
    """Every file below root with its bytes: 'nothing was touched' is equality of two trees."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tensor_bytes(path: Path) -> dict[str, bytes]:
    header, _, start = read_header(path)
    raw = path.read_bytes()
    return {k: raw[start + e["data_offsets"][0]:start + e["data_offsets"][1]] for k, e in header.items()}


# -- names ----------------------------------------------------------------------------------------

HOSTILE = [
    "", "..", "../x", "a/../../x", "a/..", "/etc/passwd", "//server/share", "C:/Windows/x", "C:x",
    "a\\..\\x", "a:1", "<script>", "a>b", "a|b", 'a"b', "a?", "a*", "a\nb", "a\rb", "a\tb", "a\x00b",
    "a\u2028b", "a\u202eb", " a", "a ", "a.", ".a", "a/ b", "a/.hidden", "a//b", "a/", "./a", "x" * 201,
    "con", "nul.txt", "sub/LPT1", "a.ckpt",
]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_names_are_refused_and_touch_nothing(lib, unet, name):
    lib.save(random_spm(unet, ["cat"]), "ok")
    before = tree(lib.root)
    with pytest.raises(SPMValueError):
        lib.path_of(name)
    with pytest.raises(SPMValueError):
        lib.save(random_spm(unet, ["cat"]), name)
    with pytest.raises(SPMValueError):
        lib.rename("ok", name)
    with pytest.raises((SPMValueError, SPMKeyError)):
        lib.delete(name)
    assert tree(lib.root) == before
    assert [p.name for p in lib.root.parent.iterdir()] == ["spm"]  # nothing written next to the folder


@pytest.mark.parametrize("name, rel", [
    ("a", "a.safetensors"),
    ("moderation/nsfw", "moderation/nsfw.safetensors"),
    ("van gogh v2.1", "van gogh v2.1.safetensors"),
    ("ünï cødé", "ünï cødé.safetensors"),
    ("a.safetensors", "a.safetensors"),  # the suffix is forgiven
])
def test_good_names_map_inside_the_folder(lib, name, rel):
    assert lib.path_of(name) == lib.root / rel
    assert check_name(name) == rel[: -len(".safetensors")]


def test_symlinked_file_leading_out_is_skipped_and_refused(lib, unet, tmp_path):
    outside = tmp_path / "outside.safetensors"
    random_spm(unet, ["cat"]).save(outside)
    lib.save(random_spm(unet, ["dog"]), "inside")
    (lib.root / "evil.safetensors").symlink_to(outside)
    (lib.root / "alias.safetensors").symlink_to(lib.root / "inside.safetensors")  # stays inside: fine

    assert [e.name for e in lib.entries()] == ["alias", "inside"]
    with pytest.raises(SPMValueError, match="outside"):
        lib.path_of("evil")
    with pytest.raises(SPMValueError):
        lib.load("evil")
    with pytest.raises(SPMValueError):
        lib.delete("evil")
    assert outside.is_file()


def test_symlinked_folder_leading_out_is_skipped_and_refused(lib, unet, tmp_path):
    ext = tmp_path / "ext"
    ext.mkdir()
    random_spm(unet, ["cat"]).save(ext / "x.safetensors")
    lib.root.mkdir()
    (lib.root / "ext").symlink_to(ext, target_is_directory=True)
    (lib.root / "loop").symlink_to(lib.root, target_is_directory=True)  # must not recurse forever
    lib.save(random_spm(unet, ["dog"]), "sub/y")

    assert [e.name for e in lib.entries()] == ["sub/y"]
    with pytest.raises(SPMValueError, match="outside"):
        lib.path_of("ext/x")
    with pytest.raises(SPMValueError):
        lib.save(random_spm(unet, ["cat"]), "ext/new")
    assert sorted(p.name for p in ext.iterdir()) == ["x.safetensors"]


# -- listing --------------------------------------------------------------------------------------

def test_entry_fields(lib, unet):
    lib.save(arch_spm(768, ["van gogh", "monet"]), "art/painters")
    (lib.root / "art" / "painters.preview.png").write_bytes(b"png")
    spm = random_spm(unet, ["cat"], rank=2, alpha=0.5)
    spm.metadata.description = "cats"
    lib.save(spm, "cat")

    a, b = lib.entries()
    assert (a.name, b.name) == ("art/painters", "cat")
    assert a.targets == ("van gogh", "monet") and a.arch == "sd1" and a.rank == 1 and a.alpha == 1.0
    assert a.preview == lib.root / "art" / "painters.preview.png"
    assert a.sha256 == file_sha256(a.path) and a.short_hash == a.sha256[:10]
    assert a.metadata["prompts"] == "van gogh,monet" and a.error is None
    assert a.size_bytes == a.path.stat().st_size and a.slices == ("painters",)
    assert b.arch is None and b.rank == 2 and b.alpha == 0.5 and b.description == "cats" and b.preview is None
    row = a.as_row()
    assert row[:4] == ["art/painters", "van gogh, monet", "sd1", 1] and row[6] == a.sha256[:10]
    assert lib.get("art/painters") == a


def test_preview_lookup_order_follows_the_webui(lib, unet):
    lib.save(random_spm(unet, ["cat"]), "cat")
    (lib.root / "cat.preview.jpg").write_bytes(b"j")
    assert lib.get("cat").preview.name == "cat.preview.jpg"
    (lib.root / "cat.png").write_bytes(b"p")  # <stem>.png comes first; no file change needed
    assert lib.entries()[0].preview.name == "cat.png"


def test_bad_files_are_listed_with_their_error(lib, unet, tmp_path):
    lib.save(random_spm(unet, ["cat"]), "good")
    (lib.root / "garbage.safetensors").write_bytes(b"\x00" * 3)
    with open(lib.root / "pickled.safetensors", "wb") as f:
        pickle.dump({"x": 1}, f, protocol=4)
    torch.save({"w": torch.zeros(2)}, lib.root / "torchsave.safetensors")
    write_file(lib.root / "not_spm.safetensors", {"foo": torch.zeros(2)}, {"note": "<b>x</b>"})

    entries = {e.name: e for e in lib.entries()}
    assert sorted(entries) == ["garbage", "good", "not_spm", "pickled", "torchsave"]
    assert entries["good"].error is None
    assert "truncated" in entries["garbage"].error
    assert "pickle" in entries["pickled"].error and "pickle" in entries["torchsave"].error
    assert "unknown key" in entries["not_spm"].error
    assert entries["not_spm"].metadata == {"note": "<b>x</b>"}  # what could be read is shown
    assert entries["garbage"].as_row()[1].startswith("error: ")


def test_training_checkpoints_and_hidden_files_are_not_listed(lib, unet):
    lib.save(random_spm(unet, ["cat"]), "cat")
    shutil.copy(lib.path_of("cat"), lib.root / "cat.ckpt.safetensors")
    shutil.copy(lib.path_of("cat"), lib.root / ".cat.safetensors.x1.tmp")
    shutil.copy(lib.path_of("cat"), lib.root / ".hidden.safetensors")
    assert [e.name for e in lib.entries()] == ["cat"]


def test_listing_again_reads_only_changed_files(lib, unet, monkeypatch):
    for i in range(4):
        lib.save(random_spm(unet, [f"c{i}"], seed=i), f"s{i}")
    lib = SPMLibrary(lib.root)  # a fresh library: save() has already read its own files
    calls = []
    real = library.load_spm
    monkeypatch.setattr(library, "load_spm", lambda p, **kw: calls.append(Path(p).name) or real(p, **kw))

    lib.entries()
    lib.entries()
    assert len(calls) == 4
    random_spm(unet, ["new"], seed=9).save(lib.path_of("s2"), overwrite=True)  # changed under us
    assert [e.targets for e in lib.entries()][2] == ("new",)
    assert calls[4:] == ["s2.safetensors"]
    lib.entries(refresh=True)
    assert len(calls) == 9

    calls.clear()
    first = lib.load("s1")
    assert lib.load("s1") is first and calls == ["s1.safetensors"]
    lib.path_of("s1").unlink()
    assert [e.name for e in lib.entries()] == ["s0", "s2", "s3"]
    with pytest.raises(SPMKeyError, match="s1"):
        lib.load("s1")


def test_get_load_unique_name_and_save(lib, unet):
    with pytest.raises(SPMKeyError, match="nope"):
        lib.get("nope")
    assert lib.entries() == []  # a missing folder is an empty library
    lib.save(arch_spm(2048), "xl")
    assert lib.load("xl", expected_arch="sdxl").arch == "sdxl"
    with pytest.raises(ArchitectureMismatch):
        lib.load("xl", expected_arch="sd1")
    with pytest.raises(SPMValueError, match="already exists"):
        lib.save(arch_spm(2048, seed=1), "xl")
    lib.save(arch_spm(2048, ["b"], seed=1), "xl", overwrite=True)
    assert lib.get("xl").targets == ("b",)
    assert lib.unique_name("xl") == "xl-1"
    lib.save(arch_spm(768), "xl-1")
    assert lib.unique_name("xl") == "xl-2"
    assert lib.unique_name("other") == "other"


# -- rename / delete ------------------------------------------------------------------------------

SIDES = [".png", ".preview.webp", ".json", ".txt", ".description.txt", ".ckpt.safetensors"]


def with_sidecars(lib, unet, name):
    lib.save(random_spm(unet, ["cat"]), name)
    path = lib.path_of(name)
    for s in SIDES:
        path.with_name(path.name[: -len(".safetensors")] + s).write_bytes(s.encode())
    return path


def test_rename_moves_sidecars_into_new_folders(lib, unet):
    with_sidecars(lib, unet, "a")
    lib.save(random_spm(unet, ["dog"]), "ab")  # a name sharing the prefix keeps its files
    (lib.root / "ab.png").write_bytes(b"ab")
    before = tree(lib.root)

    entry = lib.rename("a", "pets/cat")
    after = tree(lib.root)
    assert entry.name == "pets/cat" and entry.preview == lib.root / "pets" / "cat.png"
    assert after == {k.replace("a.", "pets/cat.", 1) if k.startswith("a.") else k: v for k, v in before.items()}
    assert [e.name for e in lib.entries()] == ["ab", "pets/cat"]
    with pytest.raises(SPMKeyError):
        lib.get("a")


def test_rename_never_overwrites(lib, unet):
    with_sidecars(lib, unet, "a")
    lib.save(random_spm(unet, ["dog"]), "b")
    before = tree(lib.root)
    with pytest.raises(SPMValueError, match="already exists"):
        lib.rename("a", "b")
    (lib.root / "c.json").write_bytes(b"orphan")  # a stray sidecar of the new name blocks it too
    before = tree(lib.root)
    with pytest.raises(SPMValueError, match="c.json"):
        lib.rename("a", "c")
    with pytest.raises(SPMValueError, match="already has"):
        lib.rename("a", "a")
    with pytest.raises(SPMKeyError):
        lib.rename("missing", "d")
    assert tree(lib.root) == before


def test_rename_is_all_or_nothing(lib, unet, monkeypatch):
    with_sidecars(lib, unet, "a")
    before = tree(lib.root)
    real, moved = shutil.move, []

    def flaky(src, dst):  # the fourth file (a.json, after a.png and a.preview.webp) cannot move
        if Path(src).name == "a.json":
            raise PermissionError(13, "Permission denied")
        moved.append(Path(src).name)
        return real(src, dst)

    monkeypatch.setattr(library.shutil, "move", flaky)
    with pytest.raises(SPMValueError, match="Permission denied"):
        lib.rename("a", "deep/er/b")
    assert moved[:3] == ["a.safetensors", "a.png", "a.preview.webp"] and len(moved) == 6  # 3 there, 3 back
    assert tree(lib.root) == before
    assert not (lib.root / "deep").exists()  # folders it made are gone again


def test_delete_removes_file_and_sidecars_only(lib, unet):
    with_sidecars(lib, unet, "a")
    lib.save(random_spm(unet, ["dog"]), "ab")
    (lib.root / "ab.png").write_bytes(b"ab")
    lib.entries()
    lib.delete("a")
    assert sorted(tree(lib.root)) == ["ab.png", "ab.safetensors"]
    assert [e.name for e in lib.entries()] == ["ab"]
    with pytest.raises(SPMKeyError):
        lib.delete("a")


# -- edit -----------------------------------------------------------------------------------------

def test_edit_keeps_every_tensor_byte_identical(lib):
    # a peft-dialect fp16 file: a re-save through SPMFile would rename keys and change dtypes
    g = torch.Generator().manual_seed(0)
    tensors = {f"{TO_K}.lora_A.weight": torch.randn(2, 768, generator=g).half(),
               f"{TO_K}.lora_B.weight": torch.randn(320, 2, generator=g).half()}
    path = write_file(lib.root / "peft.safetensors", tensors, {"prompts": "cat,dog", "custom": "kept"})
    old_sha, old_tensors = file_sha256(path), tensor_bytes(path)

    entry = lib.edit("peft", targets=[" kitten ", "puppy, small", "kitten"], description="  soft <b>  ")
    assert tensor_bytes(path) == old_tensors
    assert entry.targets == ("kitten", "puppy, small") and entry.description == "soft <b>"
    assert entry.sha256 != old_sha and entry.sha256 == file_sha256(path)
    _, md = read_file(path)
    assert md["custom"] == "kept" and md["spm_targets"] == '["kitten", "puppy, small"]'
    assert lib.load("peft").metadata.targets == ["kitten", "puppy, small"]

    lib.edit("peft", description="")
    assert lib.get("peft").description == "" and lib.get("peft").targets == ("kitten", "puppy, small")
    assert tensor_bytes(path) == old_tensors


@pytest.mark.parametrize("targets", [[], [""], ["  "], ["a\nb"], ["ok", "a\x00"], "cat", [1]], ids=repr)
def test_edit_refuses_bad_targets(lib, unet, targets):
    lib.save(random_spm(unet, ["cat"]), "cat")
    before = tree(lib.root)
    with pytest.raises(SPMValueError):
        lib.edit("cat", targets=targets)
    assert tree(lib.root) == before


def test_edit_is_atomic(lib, unet, monkeypatch):
    lib.save(random_spm(unet, ["cat"]), "cat")
    before = tree(lib.root)

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(SPMValueError, match="No space left"):
        lib.edit("cat", targets=["dog"], description="d")
    assert tree(lib.root) == before  # original intact, no temporary left behind
    monkeypatch.undo()
    assert lib.get("cat").targets == ("cat",)


def test_edit_of_packs(lib, unet):
    one = random_spm(unet, ["a", "b"], rank=2, slices=[Slice("compressed", ("a", "b"), 2)])
    lib.save(one, "compressed")
    assert lib.edit("compressed", targets=["c"]).targets == ("c",)
    assert lib.load("compressed").slices()[0].concepts == ("c",)

    two = random_spm(unet, ["a", "b"], rank=2, slices=[Slice("a", ("a",), 1), Slice("b", ("b",), 1)])
    lib.save(two, "pack")
    before = tree(lib.root)
    with pytest.raises(SPMValueError, match="2 slices"):
        lib.edit("pack", targets=["c"])
    assert tree(lib.root) == before
    assert lib.edit("pack", description="two").description == "two"
