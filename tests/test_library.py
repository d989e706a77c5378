"""The SPM folder: hostile names, links leading out, sidecars on rename/delete, byte-exact and
atomic metadata edits, bad files in the listing, and the per-file cache."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from models import tiny_sd1
from spm_helpers import random_spm

from lib_spm.errors import ArchitectureMismatch, SPMFolderError, SPMKeyError, SPMNameError, SPMValueError
from lib_spm.format.metadata import Slice, SPMMetadata
from lib_spm.format.safetensors_io import read_file, read_header, write_file
from lib_spm.format.spm_file import LayerWeights, SPMFile, file_sha256
from lib_spm.operations import library
from lib_spm.operations.library import SPMLibrary, check_name

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
    with pytest.raises(SPMFolderError, match="Permission denied"):
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
    with pytest.raises(SPMFolderError, match="No space left"):
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


# -- hostile folder cases: other SPMs' files stay where they are, byte for byte ---------------------

def folder(lib, unet, spms, files) -> dict[str, bytes]:
    for i, name in enumerate(spms):
        lib.save(random_spm(unet, ["cat"], seed=i), name)
    for f in files:
        (lib.root / f).parent.mkdir(parents=True, exist_ok=True)
        (lib.root / f).write_bytes(f.encode())
    return tree(lib.root)


X_FILES = ["x.png", "x.preview.png", "x.preview.json", "x.json"]
Y_FILES = ["y.txt", "y.description.txt", "y.description.json"]
FOLDER_CASES = [
    # (SPMs, other files, operation, the only files that may change: {before: after, or None if gone})
    (["x", "x.preview"], X_FILES, ("rename", "x", "x2"),
     {"x.safetensors": "x2.safetensors", "x.png": "x2.png", "x.json": "x2.json"}),
    (["x", "x.preview"], X_FILES, ("rename", "x.preview", "z"),  # x claims x.preview.png too: it stays
     {"x.preview.safetensors": "z.safetensors", "x.preview.json": "z.json"}),
    (["x", "x.preview"], X_FILES, ("delete", "x"), {"x.safetensors": None, "x.png": None, "x.json": None}),
    (["x", "x.preview"], X_FILES, ("delete", "x.preview"), {"x.preview.safetensors": None, "x.preview.json": None}),
    (["y", "y.description"], Y_FILES, ("delete", "y"), {"y.safetensors": None, "y.txt": None}),
    (["y", "y.description"], Y_FILES, ("rename", "y", "d/y"), {"y.safetensors": "d/y.safetensors", "y.txt": "d/y.txt"}),
    (["y", "y.description"], Y_FILES, ("delete", "y.description"),
     {"y.description.safetensors": None, "y.description.json": None}),
    (["s/x", "s/x.preview"], ["s/x.preview.webp", "s/x.jpg"], ("rename", "s/x", "x"),
     {"s/x.safetensors": "x.safetensors", "s/x.jpg": "x.jpg"}),
    (["x.preview", "x.preview.preview"], ["x.preview.preview.png", "x.preview.png"], ("delete", "x.preview"),
     {"x.preview.safetensors": None, "x.preview.png": None}),  # x.preview.preview.png is claimed twice
    (["c", "c.preview"], ["c.ckpt.safetensors", "c.preview.ckpt.safetensors", "c.preview.gif"], ("delete", "c"),
     {"c.safetensors": None, "c.ckpt.safetensors": None}),
    (["x"], ["x.png", "x.preview.png", "x2.png"], ("rename", "x", "x2"), None),  # x2.png is in the way: nothing moves
] + [
    (["p", "p.preview"], [f"p.preview.{ext}", f"p.{ext}"], ("delete", "p"), {"p.safetensors": None, f"p.{ext}": None})
    for ext in library.PREVIEW_EXTS
]


@pytest.mark.parametrize("spms, files, op, changes", FOLDER_CASES, ids=lambda v: repr(v) if isinstance(v, tuple) else None)
def test_folder_operations_leave_other_spms_files_untouched(lib, unet, spms, files, op, changes):
    before = folder(lib, unet, spms, files)
    verb, *args = op
    if changes is None:
        with pytest.raises(SPMValueError, match="already exists"):
            getattr(lib, verb)(*args)
        assert tree(lib.root) == before
        return
    getattr(lib, verb)(*args)
    expected = {changes.get(k, k): v for k, v in before.items() if changes.get(k, k) is not None}
    assert tree(lib.root) == expected


def test_each_file_shows_for_the_spm_that_claims_it_most_specifically(lib, unet):
    folder(lib, unet, ["x", "x.preview", "y", "y.description"], X_FILES[1:] + Y_FILES)
    entries = {e.name: e for e in lib.entries()}
    assert entries["x.preview"].preview == lib.root / "x.preview.png"
    assert entries["x"].preview is None  # x.preview.png is x.preview's own <stem>.png
    assert library.sidecar_claims("x.preview.png", set(os.listdir(lib.root))) == ("x.preview", "x")
    assert library.sidecar_claims("y.description.txt", set(os.listdir(lib.root))) == ("y.description", "y")
    assert library.sidecar_claims("x.preview.png", {"x.safetensors", "x.preview.ckpt.safetensors"}) == ("x",)
    lib.delete("x.preview")
    assert lib.get("x").preview == lib.root / "x.preview.png"  # kept, and now x's alone


# -- name limits in bytes -------------------------------------------------------------------------

LIMIT = 255 - len(".ckpt.safetensors") - library.TEMP_RESERVE  # bytes in one part of a name


@pytest.mark.parametrize("name", [
    "é" * 120, "😀" * 100, "😀" * (LIMIT // 4 + 1), "é" * (LIMIT // 2 + 1), "a/" + "é" * (LIMIT // 2 + 1),
    "é" * (LIMIT // 2 + 1) + "/a",
], ids=lambda n: f"{len(n)}chars-{len(n.encode())}bytes")
def test_names_over_the_byte_limit_are_refused_before_anything_is_created(lib, unet, name):
    lib.save(random_spm(unet, ["cat"]), "ok")
    before = tree(lib.root)
    for call in (lambda: lib.path_of(name), lambda: lib.save(random_spm(unet, ["cat"]), name),
                 lambda: lib.rename("ok", name), lambda: lib.delete(name), lambda: lib.exists(name)):
        with pytest.raises(SPMNameError, match="bytes"):
            call()
    assert tree(lib.root) == before and sorted(p.name for p in lib.root.iterdir()) == ["ok.safetensors"]


@pytest.mark.parametrize("char", ["é", "😀", "a"])
def test_the_longest_name_allowed_lives_through_every_operation(lib, unet, char):
    n = min(LIMIT // len(char.encode()), library.MAX_PART)  # ASCII meets the limit in characters first
    long1, long2 = char * n, char * (n - 1) + "2"
    assert len(long1.encode()) <= LIMIT
    with pytest.raises(SPMNameError):  # the boundary: one more character is refused
        check_name(long1 + char)
    path = lib.save(random_spm(unet, ["cat"]), long1).path
    for s in (".ckpt.safetensors", ".description.txt", ".preview.jpeg"):  # the longest sidecars
        path.with_name(path.name[: -len(".safetensors")] + s).write_bytes(s.encode())
    assert lib.edit(long1, targets=["dog"]).targets == ("dog",)  # its temporary name fits too
    entry = lib.rename(long1, "sub/" + long2)
    assert entry.preview == lib.root / "sub" / (long2 + ".preview.jpeg")
    assert sorted(tree(lib.root)) == sorted(f"sub/{long2}{s}" for s in (
        ".safetensors", ".ckpt.safetensors", ".description.txt", ".preview.jpeg"))
    lib.delete("sub/" + long2)
    assert tree(lib.root) == {}


def test_a_folder_with_a_smaller_name_limit_is_respected():
    from lib_spm.operations.library import _DERIVED_BYTES  # the longest sidecar suffix and temporary name

    limit = 100 + _DERIVED_BYTES  # room for exactly 100 bytes of name
    assert check_name("é" * 50, name_max=limit) == "é" * 50
    with pytest.raises(SPMNameError, match=f"{limit}-byte"):
        check_name("é" * 51, name_max=limit)


def test_file_system_failures_are_typed_errors(lib, unet):
    lib.save(random_spm(unet, ["cat"]), "ok")
    (lib.root / "f").write_bytes(b"a file where a folder would go")
    before = tree(lib.root)
    with pytest.raises(SPMFolderError, match=r"cannot save 'f/x': File exists \(f\)"):
        lib.save(random_spm(unet, ["cat"]), "f/x")
    with pytest.raises(SPMFolderError, match="cannot rename 'ok'"):
        lib.rename("ok", "f/y")
    with pytest.raises(SPMKeyError):
        lib.get("f/x")
    assert tree(lib.root) == before


# -- edit keeps the file's mode ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o664, 0o600])
def test_edit_keeps_the_file_mode(lib, unet, mode):
    path = lib.save(random_spm(unet, ["cat"]), "cat").path
    path.chmod(mode)
    lib.edit("cat", targets=["dog"], description="d")
    assert (path.stat().st_mode & 0o7777, lib.get("cat").targets) == (mode, ("dog",))


def test_edit_through_a_link_inside_keeps_the_link(lib, unet):
    path = lib.save(random_spm(unet, ["cat"]), "real").path
    path.chmod(0o644)
    (lib.root / "alias.safetensors").symlink_to("real.safetensors")
    lib.edit("alias", targets=["dog"])
    assert (lib.root / "alias.safetensors").is_symlink() and lib.get("real").targets == ("dog",)
    assert path.stat().st_mode & 0o7777 == 0o644


# -- reserved and normalised names ----------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "COM0", "lpt0", "Com9", "COM¹", "com²", "LPT³", "lpt¹.x", "CONIN$", "conout$", "CONOUT$.tar.gz",
    "Con .txt", "sub/aux.v2", "nul/x", "PRN",
])
def test_windows_reserved_names_are_refused(lib, unet, name):
    with pytest.raises(SPMNameError, match="reserved"):
        check_name(name)
    with pytest.raises(SPMNameError):
        lib.save(random_spm(unet, ["cat"]), name)
    assert not lib.root.exists() or tree(lib.root) == {}


@pytest.mark.parametrize("name", ["COM10", "console", "com", "LPT", "conin", "nul-free", "COM¹0", "x/CON1"])
def test_names_that_only_look_reserved_pass(name):
    assert check_name(name) == name


NFC, NFD = "café/crème", "cafe\u0301/cre\u0300me"


def test_names_are_normalised_to_nfc(lib, unet):
    assert check_name(NFD) == NFC
    entry = lib.save(random_spm(unet, ["cat"]), NFD)
    assert entry.name == NFC and sorted(tree(lib.root)) == [NFC + ".safetensors"]
    assert lib.get(NFD) == lib.get(NFC) and lib.exists(NFD)
    with pytest.raises(SPMValueError, match="already exists"):
        lib.save(random_spm(unet, ["cat"]), NFD)


def test_a_file_spelled_in_nfd_answers_to_its_nfc_name(lib, unet):
    write_file(lib.root / (NFD + ".safetensors"), random_spm(unet, ["cat"]).tensors(), {"prompts": "cat"})
    (lib.root / (NFD + ".png")).write_bytes(b"p")
    assert [e.name for e in lib.entries()] == [NFC]
    assert lib.load(NFC).metadata.targets == ["cat"] and lib.get(NFC).error is None
    assert lib.get(NFC).path == lib.root / (NFD + ".safetensors")
    assert lib.rename(NFC, "plain").preview == lib.root / "plain.png"
    assert sorted(tree(lib.root)) == ["plain.png", "plain.safetensors"]
    assert [e.name for e in lib.entries()] == ["plain"]


def test_two_spellings_of_one_name_list_once_and_say_so(lib, unet):
    lib.save(random_spm(unet, ["cat"]), "café")
    write_file(lib.root / "cafe\u0301.safetensors", random_spm(unet, ["dog"], seed=1).tensors(), {"prompts": "dog"})
    (entry,) = lib.entries()
    assert entry.name == "café" and "Unicode" in entry.error
    assert entry.path == lib.root / "café.safetensors"  # the NFC spelling is the one the name opens
    assert lib.load("café").metadata.targets == ["cat"]


def test_two_spellings_neither_in_nfc_are_refused(lib, unet):
    lib.root.mkdir()
    for spelling in ("e\u0323\u0302", "\u00ea\u0323"):  # both normalise to U+1EC7
        write_file(lib.root / (spelling + ".safetensors"), random_spm(unet, ["cat"]).tensors(), {"prompts": "cat"})
    before = tree(lib.root)
    (entry,) = lib.entries()
    assert entry.name == "\u1ec7" and "Unicode" in entry.error
    with pytest.raises(SPMNameError, match="Unicode"):
        lib.delete("\u1ec7")
    assert tree(lib.root) == before


# -- previews never lead outside, details never fail -------------------------------------------------

def test_a_preview_link_leading_out_is_never_the_preview(lib, unet, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"secret")
    lib.save(random_spm(unet, ["cat"]), "cat")
    (lib.root / "cat.png").symlink_to(tmp_path / "secret.png")
    assert lib.get("cat").preview is None
    (lib.root / "cat.preview.png").symlink_to("cat.preview.png")  # a loop
    assert lib.get("cat").preview is None
    (lib.root / "cat.jpg").mkdir()  # a folder is no image
    assert lib.get("cat").preview is None
    (lib.root / "pics").mkdir()
    (lib.root / "pics" / "c.webp").write_bytes(b"w")
    (lib.root / "cat.webp").symlink_to(lib.root / "pics" / "c.webp")  # inside: fine
    assert lib.get("cat").preview == lib.root / "cat.webp" and lib.entries()[0].preview == lib.root / "cat.webp"
    lib.delete("cat")
    assert (tmp_path / "secret.png").read_bytes() == b"secret" and (lib.root / "pics" / "c.webp").is_file()


def test_deeply_nested_metadata_lists_as_an_error_never_raises(lib, unet):
    tensors = random_spm(unet, ["cat"]).tensors()
    for depth in (950, 100_000):
        deep = "[" * depth + "]" * depth
        write_file(lib.root / f"targets{depth}.safetensors", tensors, {"spm_targets": deep})
        write_file(lib.root / f"other{depth}.safetensors", tensors, {"prompts": "cat", "note": deep})
    entries = {e.name: e for e in lib.entries()}
    assert len(entries) == 4 and all(len(e.as_row()) == 7 for e in entries.values())
    assert entries["other100000"].error is None and entries["other100000"].metadata["note"].startswith("[[[")
    for depth in (950, 100_000):
        error = entries[f"targets{depth}"].error
        assert error and "\n" not in error
        assert lib.get(f"targets{depth}").error == error


def test_an_impossible_date_shows_as_unknown():
    assert library.Entry(name="x", path=Path("x.safetensors"), mtime=1e20).date == "?"
