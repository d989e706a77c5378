"""The Manage panel's handlers, without gradio: search, escaping of hostile metadata, rename /
delete / edit and their messages. ``build`` runs against a recording stand-in for gradio."""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from models import tiny_sd1
from spm_helpers import random_spm

from lib_spm.format.metadata import SPMMetadata
from lib_spm.format.safetensors_io import write_file
from lib_spm.format.spm_file import LayerWeights, SPMFile
from lib_spm.operations.library import SPMLibrary
from lib_spm.ui import manage

HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>"
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@dataclass
class Host:
    library: SPMLibrary
    arch: str | None = None

    def model_arch(self) -> str | None:
        return self.arch


def arch_spm(dim: int, targets: list[str]) -> SPMFile:
    layer = LayerWeights(torch.ones(1, dim), torch.ones(320, 1), 1.0)
    return SPMFile({TO_K: layer}, SPMMetadata(targets=targets, rank=1, alpha=1.0))


@pytest.fixture(scope="module")
def unet():
    return tiny_sd1()


@pytest.fixture
def host(tmp_path, unet) -> Host:
    lib = SPMLibrary(tmp_path / "spm")
    cats = random_spm(unet, ["tabby cat", "kitten"], seed=1)
    cats.metadata.description = "Removes CATS from images"
    lib.save(cats, "animals/cats")
    lib.save(arch_spm(768, ["van gogh"]), "art/van gogh")
    lib.save(arch_spm(2048, ["monet"]), "art/monet-xl")
    return Host(lib, "sd1")


def names_of(rows):
    return [r[0] for r in rows]


# -- table ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("search, expected", [
    ("", ["animals/cats", "art/monet-xl", "art/van gogh"]),
    ("ART/", ["art/monet-xl", "art/van gogh"]),
    ("Van", ["art/van gogh"]),  # name and target
    ("kitten", ["animals/cats"]),  # a target only
    ("cats images", ["animals/cats"]),  # description words, any case, all must match
    ("monet cats", []),
    ("   ", ["animals/cats", "art/monet-xl", "art/van gogh"]),
])
def test_search_filters_names_targets_and_descriptions(host, search, expected):
    assert names_of(manage.table(host, search)) == expected


def test_table_rows_and_architecture_fit(host):
    rows = {r[0]: r for r in manage.table(host, "")}
    assert all(len(r) == len(manage.HEADERS) for r in rows.values())
    assert rows["art/van gogh"][1:4] == ["van gogh", "sd1 ✓", 1]
    assert rows["art/monet-xl"][2] == "sdxl ✗ (model is sd1)"
    assert rows["animals/cats"][2] == "?"  # tiny test model: no known architecture
    assert rows["art/van gogh"][6] == host.library.get("art/van gogh").sha256[:10]
    host.arch = None
    assert {r[0]: r[2] for r in manage.table(host, "art")} == {"art/monet-xl": "sdxl", "art/van gogh": "sd1"}


def test_broken_files_show_their_error_in_the_table(host):
    (host.library.root / "broken.safetensors").write_bytes(b"\x80\x04junkjunk")
    (row,) = manage.table(host, "broken")
    assert row[1].startswith("error: ") and "pickle" in row[1] and row[2] == "?"


# -- details and escaping -------------------------------------------------------------------------

def test_details_escape_hostile_metadata(host, unet):
    spm = random_spm(unet, [HOSTILE, "ok, with comma"])
    spm.metadata.description = HOSTILE
    spm.metadata.extra = {HOSTILE: HOSTILE, "spm_recipe_note": '{"a": "<b>"}'}
    host.library.save(spm, "evil & co")

    html_, preview, targets, description = manage.details(host, "evil & co")
    assert "<script" not in html_ and "<img" not in html_ and "<b>" not in html_
    assert "&lt;script&gt;" in html_ and "evil &amp; co" in html_
    assert preview is None
    assert targets == f"{HOSTILE}\nok, with comma"  # a comma inside a concept: one per line
    assert manage.parse_targets_text(targets) == [HOSTILE, "ok, with comma"]
    assert description == HOSTILE  # a Textbox shows text, not HTML


def test_details_of_a_broken_file_escape_its_metadata(host):
    write_file(host.library.root / "weird.safetensors", {"x": torch.zeros(1)}, {"note": HOSTILE})
    html_, *_ = manage.details(host, "weird")
    assert "unknown key" in html_ and "<script" not in html_ and "&lt;script&gt;" in html_


def test_details_preview_and_missing(host):
    (host.library.root / "art" / "van gogh.preview.png").write_bytes(b"png")
    html_, preview, targets, description = manage.details(host, "art/van gogh")
    assert preview == str(host.library.root / "art" / "van gogh.preview.png")
    assert (targets, description) == ("van gogh", "")
    assert "sd1 ✓" in html_ and host.library.get("art/van gogh").sha256 in html_
    assert manage.details(host, None) == ("", None, "", "")
    html_, preview, *_ = manage.details(host, "<nope>")
    assert "spm-error" in html_ and "&lt;nope&gt;" in html_ and "<nope>" not in html_ and preview is None


@pytest.mark.parametrize("key", ["note", "spm_targets", "spm_slices"])
def test_details_of_deeply_nested_metadata_show_an_error_never_raise(host, unet, key):
    deep = "[" * 100_000 + "]" * 100_000
    write_file(host.library.root / "deep.safetensors", random_spm(unet, ["cat"]).tensors(), {"prompts": "cat", key: deep})
    html_, preview, *_ = manage.details(host, "deep")
    assert "deep" in html_ and preview is None
    assert ("spm-error" in html_) == (key != "note")  # a deep free-form value is shown as text
    assert "deep" in names_of(manage.table(host, ""))


def test_hostile_folder_operations_through_the_handlers(host, unet):
    lib = host.library
    lib.save(random_spm(unet, ["x"]), "art/van gogh.preview")
    (lib.root / "art" / "van gogh.preview.png").write_bytes(b"the preview of 'van gogh.preview'")
    html_, preview, *_ = manage.details(host, "art/van gogh")
    assert preview is None  # it is the other SPM's <stem>.png
    assert manage.details(host, "art/van gogh.preview")[1] == str(lib.root / "art" / "van gogh.preview.png")
    assert manage.rename(host, "art/van gogh", "art/vincent").ok
    assert manage.delete(host, "art/vincent", True).ok
    assert (lib.root / "art" / "van gogh.preview.png").read_bytes() == b"the preview of 'van gogh.preview'"
    for bad in ("COM¹", "art/conin$", "é" * 120):
        out = manage.rename(host, "art/monet-xl", bad)
        assert not out.ok and "SPM name" in out.message and "\n" not in out.message
    assert lib.exists("art/monet-xl")


@pytest.mark.parametrize("text, expected", [
    ("a, b ,,c", ["a", "b", "c"]),
    ("a, b\nc", ["a, b", "c"]),
    ("a\r\n\n b \n", ["a", "b"]),
    ("", []),
])
def test_targets_text_parsing(text, expected):
    assert manage.parse_targets_text(text) == expected


# -- rename / delete / edit -----------------------------------------------------------------------

def test_rename_through_the_handler(host):
    out = manage.rename(host, "art/van gogh", "  painters/vincent ")
    assert out.ok and out.name == "painters/vincent" and "Renamed" in out.message
    assert host.library.exists("painters/vincent") and not host.library.path_of("art/van gogh").exists()

    out = manage.rename(host, "painters/vincent", "art/monet-xl")
    assert not out.ok and out.name == "painters/vincent" and "already exists" in out.message
    out = manage.rename(host, "painters/vincent", "<b>../x")
    assert not out.ok and "&lt;b&gt;" in out.message and "<b>" not in out.message
    assert not manage.rename(host, None, "x").ok and not manage.rename(host, "gone", "x").ok
    assert manage.names(host) == ["animals/cats", "art/monet-xl", "painters/vincent"]


@pytest.mark.parametrize("confirmed", [False, None, "true", 1])
def test_delete_without_confirmation_does_nothing(host, confirmed):
    before = host.library.path_of("animals/cats").read_bytes()
    out = manage.delete(host, "animals/cats", confirmed)
    assert not out.ok and out.name == "animals/cats" and "Nothing deleted" in out.message
    assert host.library.path_of("animals/cats").read_bytes() == before


def test_delete_through_the_handler(host):
    out = manage.delete(host, "animals/cats", True)
    assert out.ok and out.name is None and "Deleted" in out.message
    assert "animals/cats" not in manage.names(host)
    out = manage.delete(host, "animals/cats", True)
    assert not out.ok and "no SPM named" in out.message
    assert not manage.delete(host, "", True).ok


def test_save_edit_through_the_handler(host):
    path = host.library.path_of("animals/cats")
    tensors_before = host.library.load("animals/cats").tensors()
    out = manage.save_edit(host, "animals/cats", "lion, tiger\n", "  big <cats>  ")
    assert out.ok and "lion, tiger" in out.message and "<cats>" not in out.message
    entry = host.library.get("animals/cats")
    assert entry.targets == ("lion", "tiger") and entry.description == "big <cats>"
    after = host.library.load("animals/cats").tensors()
    assert all(torch.equal(tensors_before[k], after[k]) for k in tensors_before) and after.keys() == tensors_before.keys()

    before = path.read_bytes()
    out = manage.save_edit(host, "animals/cats", " , ,", "x")
    assert not out.ok and "at least one target" in out.message and path.read_bytes() == before
    assert not manage.save_edit(host, None, "a", "").ok
    assert "no SPM named" in manage.save_edit(host, "nope", "a", "").message


def test_handlers_need_no_gradio(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # any `import gradio` now fails
    module = importlib.reload(manage)
    assert module.arch_label("sd1", "sdxl") == "sd1 ✗ (model is sdxl)"


# -- build, against a recording stand-in for gradio -----------------------------------------------

class _Component:
    def __init__(self, registry, value=None, **kw):
        self.value, self.kw, self.events = value, kw, {}
        registry.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, event):
        if event.startswith("_"):
            raise AttributeError(event)

        def listen(fn, inputs=None, outputs=None, **kw):
            self.events.setdefault(event, []).append((fn, inputs, outputs, kw))

        return listen


def fake_gradio(registry: list) -> types.ModuleType:
    gr = types.ModuleType("gradio")
    gr.__version__ = "3.41.2"
    for cls in ("Row", "Column", "Textbox", "Button", "Dataframe", "Dropdown", "HTML", "Image", "Checkbox",
                "Markdown"):
        setattr(gr, cls, lambda *a, value=None, **kw: _Component(registry, value, **kw))
    gr.update = lambda **kw: {"__type__": "update", **kw}
    gr.SelectData = type("SelectData", (), {"__init__": lambda self, index: setattr(self, "index", index)})
    return gr


def test_build_wires_the_panel(host, monkeypatch):
    registry: list = []
    gr = fake_gradio(registry)
    monkeypatch.setitem(sys.modules, "gradio", gr)
    changed = gr.Textbox(visible=False)
    parts = manage.build(host, changed)

    by_id = {c.kw["elem_id"]: c for c in registry if "elem_id" in c.kw}
    wanted = ["search", "refresh", "table", "select", "details", "preview", "targets", "description", "save",
              "new_name", "rename", "delete", "message"]
    assert sorted(by_id) == sorted(f"spm_manage_{w}" for w in wanted)
    assert all(parts[w] is by_id[f"spm_manage_{w}"] for w in wanted)
    assert by_id["spm_manage_table"].kw["interactive"] is False
    assert names_of(by_id["spm_manage_table"].value) == names_of(manage.table(host, ""))
    assert by_id["spm_manage_select"].kw["choices"] == manage.names(host)

    # another panel wrote a file: the tab's token changes, the table and the choices follow
    ((refresh, inputs, outputs, _),) = changed.events["change"]
    assert outputs == [parts["table"], parts["select"]]
    host.library.save(arch_spm(768, ["dali"]), "art/dali")
    rows, choices = refresh("dali", "art/monet-xl")
    assert names_of(rows) == ["art/dali"] and "art/dali" in choices["choices"] and choices["value"] == "art/monet-xl"

    # a click on a table row selects its name
    ((pick, _, outputs, _),) = parts["table"].events["select"]
    assert outputs == [parts["select"]]
    assert pick(manage.table(host, ""), gr.SelectData([1, 3]))["value"] == "art/dali"

    # delete asks the browser first; an unconfirmed click leaves the file and the token alone
    ((delete, inputs, outputs, kw),) = parts["delete"].events["click"]
    assert "confirm(" in kw["_js"] and inputs[0] is parts["select"] and outputs[1] is changed
    message, token, choices = delete("art/dali", False)
    assert host.library.exists("art/dali") and token == {"__type__": "update"}
    message, token, choices = delete("art/dali", True)
    assert not host.library.exists("art/dali") and token.isdigit() and choices["value"] is None

    ((rename, _, _, _),) = parts["rename"].events["click"]
    message, token, choices = rename("art/van gogh", "vincent")
    assert token.isdigit() and choices["value"] == "vincent" and "vincent" in choices["choices"]

    ((save, _, outputs, _),) = parts["save"].events["click"]
    message, token, info, preview, targets, description, new_name = save("vincent", "starry night", "blue")
    assert token.isdigit() and targets == "starry night" and description == "blue" and new_name == "vincent"
