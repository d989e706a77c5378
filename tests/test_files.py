"""SPM files on disk: original zoo files, round trips, bad files, save safety, LayerWeights.delta().

Full-size files are made from meta-device reference UNets (real names and shapes, no memory) with
the original trainer's writer; bad files are built byte by byte from a small SD1-shaped file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import tiny_sd1, tiny_sdxl
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

from lib_spm import (
    ArchitectureMismatch,
    LayerWeights,
    Slice,
    SPMError,
    SPMFile,
    SPMFormatError,
    SPMKeyError,
    SPMMetadata,
    SPMShapeError,
    SPMValueError,
    load_spm,
)
from lib_spm.format import archs
from lib_spm.format.names import spm_layer_paths
from lib_spm.format.zoo import write_zoo_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
PROMPTS = ["van gogh", " picasso ", "snoopy"]  # the trainer joins with ","; readers strip
TARGETS = ["van gogh", "picasso", "snoopy"]

# Published sizes of a rank-1 original zoo file (every Linear/Conv2d inside a Transformer2DModel).
# SD2 = SD1 + 16 transformer blocks x (to_k, to_v) x (1024 - 768) wider text inputs.
EXPECTED = {
    "sd1": dict(layers=192, params=423_936, conv_layers=32),
    "sd2": dict(layers=192, params=432_128, conv_layers=0),
    "sdxl": dict(layers=722, params=2_659_840, conv_layers=0),
}
SS_BASE = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


# -- helpers ----------------------------------------------------------------------------------------

def bits(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor (torch.equal would call -0.0 == 0.0)."""
    return bytes(t.detach().contiguous().flatten().view(torch.uint8).tolist())


def raw_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def raw_dtypes(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(".alpha")}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every entry of a folder with its bytes and mtime: what 'left as it was' means."""
    out = {}
    for p in sorted(folder.iterdir()):
        out[p.name] = (p.read_bytes() if p.is_file() else b"<dir>", p.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def refs():
    """Full-size reference UNets on the meta device, built once per module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = archs.reference_unet(arch)
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def zoo(refs, tmp_path_factory):
    """Original-format files, written once per (arch, dtype) with the original trainer's layout."""
    folder = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(arch, dtype=torch.float32):
        key = (arch, dtype)
        if key not in cache:
            path = folder / f"{arch}_{str(dtype).replace('torch.', '')}.safetensors"
            write_zoo_file(path, refs(arch), PROMPTS, rank=1, alpha=1.0, seed=1, dtype=dtype)
            cache[key] = path
        return cache[key]

    return get


# -- 1. original zoo files load unchanged ---------------------------------------------------------------

LOAD_CASES = [(a, d) for a in ("sd1", "sdxl") for d in DTYPES] + [("sd2", "fp32")]


@pytest.mark.parametrize("arch,dt", LOAD_CASES, ids=[f"{a}-{d}" for a, d in LOAD_CASES])
def test_zoo_file_loads_unchanged(zoo, arch, dt):
    dtype = DTYPES[dt]
    path = zoo(arch, dtype)
    raw = load_file(str(path))
    assert raw_metadata(path) == {"prompts": ",".join(PROMPTS), "rank": "1", "alpha": "1.0"}

    spm = load_spm(path)

    # every tensor of the file is in exactly one layer, bit for bit, in the file's dtype
    assert len(spm.layers) * 3 == len(raw) == EXPECTED[arch]["layers"] * 3
    for stem, w in spm.layers.items():
        assert w.down.dtype == w.up.dtype == dtype
        assert bits(w.down) == bits(raw[f"{stem}.lora_down.weight"])
        assert bits(w.up) == bits(raw[f"{stem}.lora_up.weight"])
        assert w.alpha == float(raw[f"{stem}.alpha"].float()) == 1.0
    assert spm.parameter_count == EXPECTED[arch]["params"]
    assert spm.rank == 1 and spm.ranks == {1} and spm.alphas == {1.0}

    md = spm.metadata
    assert md.format == "zoo"
    assert md.targets == TARGETS
    assert (md.rank, md.alpha, md.name, md.surrogates, md.recipe, md.slices) == (1, 1.0, None, {}, {}, None)
    assert md.extra == {}
    assert spm.arch == md.arch == arch  # from the cross-attention widths: the file does not say
    assert spm.name == path.stem
    assert spm.slices() == [Slice(path.stem, tuple(TARGETS), 1)]
    assert spm.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_spm(path, expected_arch=arch).arch == arch


def test_sd1_zoo_file_has_conv_projections(zoo, refs):
    """SD1's proj_in/proj_out are 1x1 Conv2d: the original trainer stored 4-D factors for them."""
    spm = load_spm(zoo("sd1", torch.float16))
    convs = {k: w for k, w in spm.layers.items() if w.down.dim() == 4}
    assert len(convs) == EXPECTED["sd1"]["conv_layers"]
    assert all(k.endswith(("_proj_in", "_proj_out")) for k in convs)
    w = spm.layers["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert tuple(w.down.shape) == (1, 320, 1, 1) and tuple(w.up.shape) == (320, 1, 1, 1)
    w = spm.layers["lora_unet_up_blocks_1_attentions_2_proj_out"]
    assert tuple(w.down.shape) == (1, 1280, 1, 1) and tuple(w.up.shape) == (1280, 1, 1, 1)
    k = spm.layers["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"]
    assert tuple(k.down.shape) == (1, 768) and tuple(k.up.shape) == (1280, 1)
    # the delta has the shape of the module it adapts
    unet = refs("sd1")
    for stem, module_path in [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "down_blocks.0.attentions.0.proj_in"),
        ("lora_unet_up_blocks_3_attentions_2_proj_out", "up_blocks.3.attentions.2.proj_out"),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v",
         "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"),
    ]:
        module = unet.get_submodule(module_path)
        assert isinstance(module, nn.Conv2d if "proj" in stem else nn.Linear)
        assert spm.layers[stem].delta().shape == module.weight.shape


def test_sdxl_zoo_file_uses_diffusers_names(zoo):
    spm = load_spm(zoo("sdxl", torch.bfloat16))
    pattern = re.compile(
        r"^lora_unet_(down_blocks_[12]|up_blocks_[01]|mid_block)_attentions_\d_"
        r"(proj_in|proj_out|transformer_blocks_\d_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))$"
    )
    bad = [k for k in spm.layers if not pattern.match(k)]
    assert bad == []
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in spm.layers
    assert "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2" in spm.layers
    assert not any(k.startswith("lora_unet_down_blocks_0_") for k in spm.layers)  # SDXL level 0: no attention
    assert all(w.down.dim() == 2 for w in spm.layers.values())  # linear projections
    w = spm.layers["lora_unet_down_blocks_1_attentions_0_proj_in"]
    assert tuple(w.down.shape) == (1, 640) and tuple(w.up.shape) == (640, 1)
    k = spm.layers["lora_unet_mid_block_attentions_0_transformer_blocks_3_attn2_to_k"]
    assert tuple(k.down.shape) == (1, 2048) and tuple(k.up.shape) == (1280, 1)


TINY = {"tiny_sd1_conv": lambda: tiny_sd1(False), "tiny_sd1_linear": lambda: tiny_sd1(True), "tiny_sdxl": tiny_sdxl}


@pytest.mark.parametrize("model", list(TINY))
def test_tiny_zoo_file_rank2(model, tmp_path):
    unet = TINY[model]()
    path = tmp_path / "tiny.safetensors"
    write_zoo_file(path, unet, ["cat", "dog"], rank=2, alpha=0.5, seed=3)
    spm = load_spm(path)

    expected_params = 0
    for p in spm_layer_paths(unet):
        m = unet.get_submodule(p)
        if isinstance(m, nn.Conv2d):
            expected_params += 2 * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
        else:
            expected_params += 2 * (m.in_features + m.out_features)
        w = spm.layers["lora_unet_" + p.replace(".", "_")]
        assert w.delta().shape == m.weight.shape
    assert len(spm.layers) == len(spm_layer_paths(unet)) > 0
    assert spm.parameter_count == expected_params
    assert spm.rank == 2 and spm.metadata.rank == 2
    assert spm.alphas == {0.5} and spm.metadata.alpha == 0.5
    assert all(w.scale == 0.25 for w in spm.layers.values())
    assert spm.metadata.format == "zoo" and spm.metadata.targets == ["cat", "dog"]
    assert spm.arch is None  # a 12-wide text encoder is no SD1/SD2/SDXL
    has_conv = any(w.down.dim() == 4 for w in spm.layers.values())
    assert has_conv == (model == "tiny_sd1_conv")


# -- 2. round trip ------------------------------------------------------------------------------------------

ROUND_TRIPS = [("sd1", "fp32"), ("sd1", "fp16"), ("sd1", "bf16"), ("sd2", "fp32"), ("sdxl", "fp32"), ("sdxl", "bf16")]


@pytest.mark.parametrize("arch,dt", ROUND_TRIPS, ids=[f"{a}-{d}" for a, d in ROUND_TRIPS])
def test_round_trip(zoo, tmp_path, arch, dt):
    dtype = DTYPES[dt]
    src = load_spm(zoo(arch, dtype))
    md = src.metadata
    md.targets = ["cat, sitting", "猫", "dog"]
    md.surrogates = {"cat, sitting": "animal", "dog": ""}
    md.name = "my membrane"
    md.description = "erases cats\nand dogs"
    md.recipe = {"lr": 1e-4, "steps": 500, "nested": {"a": [1, 2.5, "x"]}, "ok": True}
    out = tmp_path / "out.safetensors"

    assert src.save(out) == out
    back = load_spm(out)

    assert set(back.layers) == set(src.layers)
    for stem, w in src.layers.items():
        b = back.layers[stem]
        assert b.down.dtype == b.up.dtype == dtype
        assert bits(b.down) == bits(w.down) and bits(b.up) == bits(w.up)
        assert b.alpha == w.alpha
    assert back.metadata == dataclasses.replace(md, format="spm")
    assert back.metadata.targets == ["cat, sitting", "猫", "dog"]
    assert back.arch == arch and back.name == "my membrane"
    assert back.slices() == [Slice("my membrane", ("cat, sitting", "猫", "dog"), 1)]

    raw = raw_metadata(out)
    # the original trainer's three keys still there and readable the way it reads them
    assert int(raw["rank"]) == 1 and float(raw["alpha"]) == 1.0
    assert raw["prompts"] == "cat, sitting,猫,dog"
    assert json.loads(raw["spm_targets"]) == ["cat, sitting", "猫", "dog"]
    # what the WebUI's built-in Lora reads
    assert raw["ss_base_model_version"] == SS_BASE[arch]
    assert raw["ss_v2"] == str(arch == "sd2")
    assert raw["ss_network_dim"] == "1"
    assert float(raw["ss_network_alpha"]) == 1.0
    assert raw["ss_output_name"] == "my membrane"
    assert raw["spm_arch"] == arch and raw["spm_format"] == "1"
    assert raw_dtypes(out) == {ST_DTYPE[dtype]}

    # saving what was loaded gives the same metadata again
    again = tmp_path / "again.safetensors"
    back.save(again)
    assert raw_metadata(again) == raw
    assert load_spm(again).metadata == back.metadata


@pytest.mark.parametrize("to", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_save_with_dtype_converts_tensors(zoo, tmp_path, to):
    src = load_spm(zoo("sd1", torch.float32))
    out = tmp_path / "half.safetensors"
    src.save(out, dtype=to)
    assert raw_dtypes(out) == {ST_DTYPE[to]}
    back = load_spm(out)
    for stem, w in src.layers.items():
        b = back.layers[stem]
        assert b.down.dtype == b.up.dtype == to
        assert bits(b.down) == bits(w.down.to(to)) and bits(b.up) == bits(w.up.to(to))
        assert b.alpha == 1.0
    assert back.parameter_count == EXPECTED["sd1"]["params"]
    assert src.layers[next(iter(src.layers))].down.dtype == torch.float32  # the source is not converted


def test_every_file_save_writes_loads_back(tmp_path):
    """Whatever the header length comes out as, what SPMFile.save writes, load_spm reads."""
    failed = {}
    for n in range(0, 80):  # descriptions of 0..79 characters: header lengths across a few hundred bytes
        spm = SPMFile({K: LayerWeights(torch.zeros(1, 768), torch.zeros(320, 1), 1.0)},
                      SPMMetadata(targets=["cat"], description="x" * n))
        path = spm.save(tmp_path / f"d{n}.safetensors")
        try:
            assert load_spm(path).metadata.description == "x" * n
        except SPMError as e:
            failed[n] = (struct.unpack("<Q", path.read_bytes()[:8])[0], str(e))
    assert failed == {}, f"description length -> (header length, error): {failed}"


def test_extra_metadata_kept_verbatim(tmp_path):
    path = tmp_path / "extra.safetensors"
    md = {"prompts": "cat", "rank": "1", "alpha": "1.0", "modelspec.title": "Cat eraser", "ss_training_comment": "trained on 12 images"}
    save_file(small_sd1(), str(path), md)
    spm = load_spm(path)
    assert spm.metadata.extra == {"modelspec.title": "Cat eraser", "ss_training_comment": "trained on 12 images"}
    out = tmp_path / "out.safetensors"
    spm.save(out)
    raw = raw_metadata(out)
    assert raw["modelspec.title"] == "Cat eraser" and raw["ss_training_comment"] == "trained on 12 images"
    assert load_spm(out).metadata.extra == spm.metadata.extra


def test_save_over_the_file_it_came_from(zoo, tmp_path):
    path = tmp_path / "self.safetensors"
    path.write_bytes(zoo("sd1", torch.float16).read_bytes())
    spm = load_spm(path)
    spm.metadata.description = "edited"
    spm.save(path, overwrite=True)
    back = load_spm(path)
    assert back.metadata.description == "edited"
    assert all(bits(back.layers[k].down) == bits(w.down) for k, w in spm.layers.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["self.safetensors"]


# -- 3. bad files ---------------------------------------------------------------------------------------

K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SD1: 768 -> 320
P = "lora_unet_down_blocks_0_attentions_0_proj_in"  # SD1: 1x1 conv 320 -> 320
ZOO_MD = {"prompts": "cat", "rank": "1", "alpha": "1.0"}


def small_sd1(rank: int = 1) -> dict[str, torch.Tensor]:
    """The smallest file that is recognisably SD1: a cross-attention key and a conv projection."""
    g = torch.Generator().manual_seed(0)
    return {
        f"{K}.lora_down.weight": torch.randn(rank, 768, generator=g) * 0.02,
        f"{K}.lora_up.weight": torch.randn(320, rank, generator=g) * 0.02,
        f"{K}.alpha": torch.tensor(1.0),
        f"{P}.lora_down.weight": torch.randn(rank, 320, 1, 1, generator=g) * 0.02,
        f"{P}.lora_up.weight": torch.randn(320, rank, 1, 1, generator=g) * 0.02,
        f"{P}.alpha": torch.tensor(1.0),
    }


def valid_bytes(md=ZOO_MD) -> bytes:
    return st_save(small_sd1(), metadata=md)


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def tensors(edit=None, md=ZOO_MD, rank=1) -> bytes:
    t = small_sd1(rank)
    if edit:
        edit(t)
    return st_save(t, metadata=md)


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _del(key):
    return lambda t: t.pop(key)


def _rename(old, new):
    return lambda t: t.__setitem__(new, t.pop(old))


def _poke(key, index, value):
    def edit(t):
        t[key] = t[key].clone()
        t[key].view(-1)[index] = value
    return edit


def _offsets_out_of_range():
    header, data = split(valid_bytes())
    k = f"{P}.lora_up.weight"
    b, e = header[k]["data_offsets"]
    header[k]["data_offsets"] = [len(data), len(data) + (e - b)]
    return join(header, data)


def _offsets_negative():
    header, data = split(valid_bytes())
    k = f"{K}.lora_down.weight"
    b, e = header[k]["data_offsets"]
    header[k]["data_offsets"] = [b - 8, e - 8]
    return join(header, data)


def _overlap():
    header, data = split(valid_bytes())
    a, b = header[f"{K}.lora_up.weight"], header[f"{K}.lora_down.weight"]
    a["data_offsets"], a["shape"] = list(b["data_offsets"]), [768, 1]
    return join(header, data)


def _size_mismatch():
    header, data = split(valid_bytes())
    header[f"{K}.lora_down.weight"]["shape"] = [1, 700]
    return join(header, data)


def _metadata_not_strings():
    header, data = split(valid_bytes())
    header["__metadata__"] = {"prompts": "cat", "rank": 1}
    return join(header, data)


def _header_list():
    raw = b"[1, 2, 3]"
    return struct.pack("<Q", len(raw)) + raw


def _pickle(new_zip: bool):
    import io
    buf = io.BytesIO()
    torch.save(small_sd1(), buf, _use_new_zipfile_serialization=new_zip)
    return buf.getvalue()


def _truncated(where):
    blob = valid_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return {"half": blob[: len(blob) // 2], "in_header": blob[: 8 + n // 2], "4_bytes": blob[:4], "empty": b""}[where]


def _header_text(edit) -> bytes:
    """The valid file with its header JSON text edited (for what json.dumps cannot write)."""
    header, data = split(valid_bytes())
    raw = edit(json.dumps(header)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(field, value):
    def build():
        header, data = split(valid_bytes())
        header[f"{K}.lora_down.weight"][field] = value
        return join(header, data)
    return build


def _bomb(where: str, depth: int = 1000) -> bytes:
    bomb = "[" * depth + "]" * depth
    if where == "header":
        return struct.pack("<Q", len(bomb)) + bomb.encode()
    return tensors(md={**ZOO_MD, "spm_format": "1", where: bomb})


def _slices(entries) -> bytes:
    return tensors(md={**ZOO_MD, "spm_format": "1", "spm_slices": json.dumps(entries)})


def _alpha_f32(value):
    return _set(f"{K}.alpha", torch.tensor(value, dtype=torch.float32))


def _as_dtype(dtype, scale=1.0):
    def edit(t):
        for k in list(t):
            t[k] = (t[k].double() * (scale if "lora_up" in k else 1.0)).to(dtype)
    return edit


def _trailing(n: int) -> bytes:
    return valid_bytes() + b"\0" * n


def _gap() -> bytes:
    header, data = split(valid_bytes())
    for e in header.values():
        if isinstance(e, dict) and "data_offsets" in e:
            e["data_offsets"] = [o + 8 for o in e["data_offsets"]]
    return join(header, b"\0" * 8 + data)


# (id, file name, bytes builder, error type, load kwargs)
BAD = [
    ("suffix_ckpt", "x.ckpt", valid_bytes, SPMFormatError, {}),
    ("suffix_pt", "x.pt", lambda: _pickle(True), SPMFormatError, {}),
    ("no_suffix", "x", valid_bytes, SPMFormatError, {}),
    ("pickle_zip", "x.safetensors", lambda: _pickle(True), SPMFormatError, {}),
    ("pickle_legacy", "x.safetensors", lambda: _pickle(False), SPMFormatError, {}),
    ("truncated_half", "x.safetensors", lambda: _truncated("half"), SPMFormatError, {}),
    ("truncated_in_header", "x.safetensors", lambda: _truncated("in_header"), SPMFormatError, {}),
    ("truncated_4_bytes", "x.safetensors", lambda: _truncated("4_bytes"), SPMFormatError, {}),
    ("empty", "x.safetensors", lambda: _truncated("empty"), SPMFormatError, {}),
    ("header_len_2e40", "x.safetensors", lambda: struct.pack("<Q", 2**40) + valid_bytes()[8:], SPMFormatError, {}),
    ("header_len_max", "x.safetensors", lambda: b"\xff" * 8 + b"{}", SPMFormatError, {}),
    ("header_not_json", "x.safetensors", lambda: struct.pack("<Q", 9) + b"not json!", SPMFormatError, {}),
    ("header_not_utf8", "x.safetensors", lambda: struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", SPMFormatError, {}),
    ("header_json_list", "x.safetensors", _header_list, SPMFormatError, {}),
    ("offsets_out_of_range", "x.safetensors", _offsets_out_of_range, SPMFormatError, {}),
    ("offsets_negative", "x.safetensors", _offsets_negative, SPMFormatError, {}),
    ("tensors_overlap", "x.safetensors", _overlap, SPMFormatError, {}),
    ("size_mismatch", "x.safetensors", _size_mismatch, SPMFormatError, {}),
    ("metadata_not_strings", "x.safetensors", _metadata_not_strings, SPMFormatError, {}),
    ("int8", "x.safetensors",
     lambda: tensors(_set(f"{K}.lora_down.weight", torch.ones(1, 768, dtype=torch.int8))), SPMFormatError, {}),
    ("spm_format_99", "x.safetensors", lambda: tensors(md={**ZOO_MD, "spm_format": "99"}), SPMFormatError, {}),
    ("spm_format_text", "x.safetensors", lambda: tensors(md={**ZOO_MD, "spm_format": "v1"}), SPMFormatError, {}),
    ("metadata_rank_text", "x.safetensors", lambda: tensors(md={**ZOO_MD, "rank": "one"}), SPMFormatError, {}),
    ("metadata_unknown_arch", "x.safetensors", lambda: tensors(md={**ZOO_MD, "spm_arch": "sd3"}), SPMFormatError, {}),
    ("nan_in_down", "x.safetensors", lambda: tensors(_poke(f"{K}.lora_down.weight", 5, float("nan"))), SPMValueError, {}),
    ("nan_in_up", "x.safetensors", lambda: tensors(_poke(f"{P}.lora_up.weight", 7, float("nan"))), SPMValueError, {}),
    ("inf_in_down", "x.safetensors", lambda: tensors(_poke(f"{P}.lora_down.weight", 0, float("inf"))), SPMValueError, {}),
    ("neg_inf_in_up", "x.safetensors", lambda: tensors(_poke(f"{K}.lora_up.weight", 319, -float("inf"))), SPMValueError, {}),
    ("nan_in_alpha", "x.safetensors", lambda: tensors(_set(f"{K}.alpha", torch.tensor(float("nan")))), SPMValueError, {}),
    ("inf_in_alpha", "x.safetensors", lambda: tensors(_set(f"{P}.alpha", torch.tensor(float("inf")))), SPMValueError, {}),
    ("rank_mismatch", "x.safetensors", lambda: tensors(_set(f"{K}.lora_up.weight", torch.zeros(320, 2))), SPMShapeError, {}),
    ("missing_up", "x.safetensors", lambda: tensors(_del(f"{K}.lora_up.weight")), SPMShapeError, {}),
    ("missing_down", "x.safetensors", lambda: tensors(_del(f"{P}.lora_down.weight")), SPMShapeError, {}),
    ("conv_up_not_1x1", "x.safetensors", lambda: tensors(_set(f"{P}.lora_up.weight", torch.zeros(320, 1, 3, 3))),
     SPMShapeError, {}),
    ("ranks_differ_between_layers", "x.safetensors",
     lambda: tensors(lambda t: (t.__setitem__(f"{P}.lora_down.weight", torch.zeros(2, 320, 1, 1)),
                                t.__setitem__(f"{P}.lora_up.weight", torch.zeros(320, 2, 1, 1)))),
     SPMShapeError, {}),
    ("metadata_rank_3", "x.safetensors", lambda: tensors(md={**ZOO_MD, "rank": "3"}), SPMShapeError, {}),
    ("unknown_suffix", "x.safetensors", lambda: tensors(_rename(f"{K}.alpha", f"{K}.lora_mid.weight")), SPMKeyError, {}),
    ("unknown_prefix", "x.safetensors",
     lambda: tensors(_set("model.diffusion_model.input_blocks.1.1.proj_in.weight", torch.zeros(1))), SPMKeyError, {}),
    ("text_encoder", "x.safetensors",
     lambda: tensors(_set("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", torch.zeros(1, 768))),
     SPMKeyError, {}),
    ("text_encoder_2", "x.safetensors",
     lambda: tensors(_set("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha", torch.tensor(1.0))), SPMKeyError, {}),
    ("mixed_dialects", "x.safetensors", lambda: tensors(_set(f"{K}.lora_A.weight", torch.zeros(1, 768))), SPMKeyError, {}),
    ("spm_arch_sdxl_on_sd1", "x.safetensors",
     lambda: tensors(md={**ZOO_MD, "spm_format": "1", "spm_arch": "sdxl"}), ArchitectureMismatch, {}),
    ("ss_base_sdxl_on_sd1", "x.safetensors",
     lambda: tensors(md={**ZOO_MD, "ss_base_model_version": "sdxl_base_v1-0"}), ArchitectureMismatch, {}),
    # -- hostile headers and metadata: each a typed error, never RecursionError/TypeError/OverflowError
    ("header_nesting_bomb", "x.safetensors", lambda: _bomb("header"), SPMFormatError, {}),
    ("targets_nesting_bomb", "x.safetensors", lambda: _bomb("spm_targets"), SPMFormatError, {}),
    ("recipe_nesting_bomb", "x.safetensors", lambda: _bomb("spm_recipe"), SPMFormatError, {}),
    ("recipe_shallow_bomb", "x.safetensors", lambda: _bomb("spm_recipe", 40), SPMFormatError, {}),
    ("dtype_list", "x.safetensors", _entry("dtype", ["F32"]), SPMFormatError, {}),
    ("dtype_null", "x.safetensors", _entry("dtype", None), SPMFormatError, {}),
    ("shape_bool", "x.safetensors", _entry("shape", [True, 768]), SPMFormatError, {}),
    ("shape_float", "x.safetensors", _entry("shape", [1.0, 768]), SPMFormatError, {}),
    ("offsets_2e64", "x.safetensors", _entry("data_offsets", [2 ** 64, 2 ** 64 + 3072]), SPMFormatError, {}),
    ("offset_4300_digits", "x.safetensors", lambda: _header_text(lambda h: h.replace('"data_offsets": [0,', '"data_offsets": [' + "9" * 4300 + ",", 1)), SPMFormatError, {}),
    ("header_nan", "x.safetensors", lambda: _header_text(lambda h: h.replace('"shape": [1, 768]', '"shape": [NaN, 768]')), SPMFormatError, {}),
    ("header_duplicate_key", "x.safetensors", lambda: _header_text(lambda h: h.replace('{"__metadata__": {', '{"__metadata__": {"rank": "2", ', 1)), SPMFormatError, {}),
    ("key_lone_surrogate", "x.safetensors", lambda: _header_text(lambda h: h.replace('"__metadata__": {', '"__metadata__": {"n\\udc80": "x", ', 1)), SPMFormatError, {}),
    ("metadata_list", "x.safetensors", lambda: _header_text(lambda h: h.replace('"__metadata__": {', '"__metadata__": [{', 1).replace('"}, "lora', '"}], "lora', 1)), SPMFormatError, {}),
    ("rank_inf", "x.safetensors", lambda: tensors(md={**ZOO_MD, "rank": "inf"}), SPMFormatError, {}),
    ("rank_1e400", "x.safetensors", lambda: tensors(md={**ZOO_MD, "rank": "1e400"}), SPMFormatError, {}),
    ("rank_4300_digits", "x.safetensors", lambda: tensors(md={**ZOO_MD, "rank": "9" * 4300}), SPMFormatError, {}),
    ("rank_1_9", "x.safetensors", lambda: tensors(md={**ZOO_MD, "rank": "1.9"}), SPMFormatError, {}),
    ("rank_true", "x.safetensors", lambda: tensors(md={**ZOO_MD, "rank": "true"}), SPMFormatError, {}),
    ("alpha_nan", "x.safetensors", lambda: tensors(md={**ZOO_MD, "alpha": "nan"}), SPMFormatError, {}),
    ("targets_lone_surrogate", "x.safetensors",
     lambda: tensors(md={**ZOO_MD, "spm_format": "1", "spm_targets": '["\\ud800"]'}), SPMFormatError, {}),
    ("recipe_nan", "x.safetensors",
     lambda: tensors(md={**ZOO_MD, "spm_format": "1", "spm_recipe": '{"lr": NaN}'}), SPMFormatError, {}),
    ("recipe_infinity", "x.safetensors",
     lambda: tensors(md={**ZOO_MD, "spm_format": "1", "spm_recipe": '{"lr": 1e400}'}), SPMFormatError, {}),
    ("surrogates_not_strings", "x.safetensors",
     lambda: tensors(md={**ZOO_MD, "spm_format": "1", "spm_surrogates": '{"cat": 5}'}), SPMFormatError, {}),
    ("slices_concepts_string", "x.safetensors", lambda: _slices([{"name": "a", "concepts": "cat", "rank": 1}]),
     SPMFormatError, {}),
    ("slices_rank_1_9", "x.safetensors", lambda: _slices([{"name": "a", "concepts": ["cat"], "rank": 1.9}]),
     SPMFormatError, {}),
    ("slices_rank_true", "x.safetensors", lambda: _slices([{"name": "a", "concepts": ["cat"], "rank": True}]),
     SPMFormatError, {}),
    ("slices_rank_1e400", "x.safetensors",
     lambda: tensors(md={**ZOO_MD, "spm_format": "1",
                         "spm_slices": '[{"name": "a", "concepts": ["cat"], "rank": 1e400}]'}), SPMFormatError, {}),
    ("slices_duplicate_names", "x.safetensors",
     lambda: tensors(md={**ZOO_MD, "rank": "2", "spm_format": "1", "spm_slices": json.dumps(
         [{"name": "a", "concepts": ["cat"], "rank": 1}, {"name": "a", "concepts": ["dog"], "rank": 1}])}, rank=2),
     SPMFormatError, {}),
    ("slices_unknown_field", "x.safetensors",
     lambda: _slices([{"name": "a", "concepts": ["cat"], "rank": 1, "gate": 2}]), SPMFormatError, {}),
    # -- layout: the data is tiled exactly, nothing after it is read
    ("trailing_bytes", "x.safetensors", lambda: _trailing(1), SPMFormatError, {}),
    ("trailing_megabyte", "x.safetensors", lambda: _trailing(2 ** 20), SPMFormatError, {}),
    ("gap_before_data", "x.safetensors", _gap, SPMFormatError, {}),
    # -- sizes: nothing no supported UNet has
    ("zero_size_layer", "x.safetensors",
     lambda: tensors(lambda t: (t.__setitem__(f"{K}.lora_down.weight", torch.zeros(1, 0)),
                                t.__setitem__(f"{K}.lora_up.weight", torch.zeros(0, 1)))), SPMShapeError, {}),
    ("wider_than_any_unet", "x.safetensors",
     lambda: tensors(lambda t: (t.__setitem__(f"{K}.lora_down.weight", torch.zeros(1, 8192)))), SPMShapeError, {}),
    ("kernel_5x5", "x.safetensors",
     lambda: tensors(_set(f"{P}.lora_down.weight", torch.zeros(1, 320, 5, 5))), SPMShapeError, {}),
    # -- values finite on disk that overflow where they are used
    ("f16_65504_product", "x.safetensors", lambda: tensors(lambda t: (
        t.__setitem__(f"{K}.lora_down.weight", torch.full((1, 768), 65504.0, dtype=torch.float16)),
        t.__setitem__(f"{K}.lora_up.weight", torch.full((320, 1), 1.0, dtype=torch.float16)))), SPMValueError, {}),
    ("f16_delta_overflows_at_strength_10", "x.safetensors", lambda: tensors(lambda t: (
        t.__setitem__(f"{K}.lora_down.weight", torch.full((1, 768), 100.0, dtype=torch.float16)),
        t.__setitem__(f"{K}.lora_up.weight", torch.full((320, 1), 100.0, dtype=torch.float16)))), SPMValueError, {}),
    ("f32_alpha_3e38", "x.safetensors", lambda: tensors(_alpha_f32(3e38)), SPMValueError, {}),
    ("f64_1e200", "x.safetensors", lambda: tensors(_as_dtype(torch.float64, 1e202)), SPMValueError, {}),
    ("expected_sdxl_got_sd1", "x.safetensors", valid_bytes, ArchitectureMismatch, {"expected_arch": "sdxl"}),
    ("expected_sd2_got_sd1", "x.safetensors", valid_bytes, ArchitectureMismatch, {"expected_arch": "sd2"}),
]


def test_the_small_file_is_valid(tmp_path):
    """The control for the table below: unmodified, the bytes load and are SD1."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(valid_bytes())
    spm = load_spm(path, expected_arch="sd1")
    assert spm.arch == "sd1" and spm.rank == 1 and set(spm.layers) == {K, P}
    # the header rewrite helpers alone do not break a file
    path.write_bytes(join(*split(valid_bytes())))
    assert load_spm(path).parameter_count == 768 + 320 + 320 + 320


@pytest.mark.parametrize("name,filename,build,error,kwargs", BAD, ids=[c[0] for c in BAD])
def test_bad_file(tmp_path, name, filename, build, error, kwargs):
    path = tmp_path / filename
    path.write_bytes(build())
    before = snapshot(tmp_path)
    with pytest.raises(SPMError) as info:
        load_spm(path, **kwargs)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert "\n" not in message and path.name in message
    assert snapshot(tmp_path) == before  # nothing written, nothing touched


# Header lengths whose first two little-endian bytes are 80 02 / 80 03 / 80 04 / 80 05, the opening
# bytes of a pickle. safetensors pads headers to 8 bytes, so a real file hits these by chance.
@pytest.mark.parametrize("header_len", [632, 640, 648, 896, 1152, 1408, 65536 + 640])
def test_valid_file_with_any_header_length_loads(tmp_path, header_len):
    t = {f"{K}.lora_down.weight": torch.full((1, 768), 0.01), f"{K}.lora_up.weight": torch.full((320, 1), 0.02),
         f"{K}.alpha": torch.tensor(1.0)}
    header, data = split(st_save(t, metadata=ZOO_MD))
    header["__metadata__"]["note"] = "x" * max(0, header_len - 1000)
    raw = json.dumps(header).encode()
    assert len(raw) <= header_len
    raw += b" " * (header_len - len(raw))  # the padding safetensors itself writes
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", header_len) + raw + data)
    assert torch.equal(load_file(str(path))[f"{K}.lora_up.weight"], t[f"{K}.lora_up.weight"])  # safetensors reads it
    spm = load_spm(path)
    assert spm.arch == "sd1" and spm.layers[K].down.shape == (1, 768)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(SPMFormatError, match="nope.safetensors"):
        load_spm(tmp_path / "nope.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_other_key_dialects_load(tmp_path):
    """peft names (lora_A/lora_B) and a missing alpha (scale 1) are accepted, as the WebUI does."""
    t = small_sd1(rank=2)
    peft = {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in t.items()
            if not k.endswith(".alpha")}
    path = tmp_path / "peft.safetensors"
    save_file(peft, str(path))
    spm = load_spm(path)
    assert spm.rank == 2 and spm.alphas == {2.0} and spm.arch == "sd1"
    assert bits(spm.layers[K].down) == bits(t[f"{K}.lora_down.weight"])
    assert bits(spm.layers[P].up) == bits(t[f"{P}.lora_up.weight"])


# -- 4. save safety -------------------------------------------------------------------------------------

def _loaded_small(tmp_path) -> SPMFile:
    src = tmp_path / "src" / "small.safetensors"
    src.parent.mkdir()
    src.write_bytes(valid_bytes())
    return load_spm(src)


def test_save_refuses_to_overwrite(tmp_path):
    spm = _loaded_small(tmp_path)
    target = tmp_path / "out" / "existing.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"the user's precious file")
    before = snapshot(target.parent)
    with pytest.raises(FileExistsError):
        spm.save(target)
    assert snapshot(target.parent) == before
    spm.save(target, overwrite=True)  # and with overwrite it does replace it
    assert load_spm(target).parameter_count == spm.parameter_count
    assert [p.name for p in target.parent.iterdir()] == ["existing.safetensors"]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where,value", [("down", float("nan")), ("up", float("inf")), ("up", float("nan"))])
def test_save_refuses_non_finite(tmp_path, overwrite, where, value):
    spm = _loaded_small(tmp_path)
    w = spm.layers[K]
    t = getattr(w, where).clone()
    t.view(-1)[3] = value
    setattr(w, where, t)
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "existing.safetensors"
    target.write_bytes(valid_bytes())
    before = snapshot(folder)
    with pytest.raises(SPMValueError):
        spm.save(target, overwrite=overwrite)
    assert snapshot(folder) == before  # same bytes, no temporary files
    with pytest.raises(SPMValueError):
        spm.save(folder / "new.safetensors")
    assert snapshot(folder) == before


def test_failed_write_leaves_target_and_no_temp_file(tmp_path, monkeypatch):
    spm = _loaded_small(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "existing.safetensors"
    target.write_bytes(b"old contents")
    before = snapshot(folder)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        spm.save(target, overwrite=True)
    assert snapshot(folder) == before


@pytest.mark.parametrize("name", ["out.ckpt", "out.pt", "out"])
def test_save_refuses_other_suffixes(tmp_path, name):
    spm = _loaded_small(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(SPMFormatError):
        spm.save(folder / name)
    assert list(folder.iterdir()) == []


# -- 5. LayerWeights.delta() ------------------------------------------------------------------------------

# (id, out, in, kernel or None, rank, alpha, factor dtype)
DELTAS = [
    ("linear_r1", 6, 5, None, 1, 1.0, torch.float32),
    ("linear_r4_alpha2.5", 7, 9, None, 4, 2.5, torch.float32),
    ("linear_r3_fp16", 8, 4, None, 3, 1.0, torch.float16),
    ("linear_r2_bf16", 5, 6, None, 2, 0.5, torch.bfloat16),
    ("conv1x1_r2", 6, 5, (1, 1), 2, 1.0, torch.float32),
    ("conv3x3_r3_alpha0.5", 4, 3, (3, 3), 3, 0.5, torch.float32),
    ("conv3x1_r1_fp16", 4, 2, (3, 1), 1, 4.0, torch.float16),
]


@pytest.mark.parametrize("name,out,inp,kernel,rank,alpha,dtype", DELTAS, ids=[d[0] for d in DELTAS])
def test_delta(name, out, inp, kernel, rank, alpha, dtype):
    g = torch.Generator().manual_seed(len(name))
    if kernel is None:
        down = torch.randn(rank, inp, generator=g).to(dtype)
        up = torch.randn(out, rank, generator=g).to(dtype)
        expected = (alpha / rank) * (up.double() @ down.double())
        weight_shape = (out, inp)
    else:
        down = torch.randn(rank, inp, *kernel, generator=g).to(dtype)
        up = torch.randn(out, rank, 1, 1, generator=g).to(dtype)
        expected = (alpha / rank) * torch.einsum("or,rihw->oihw", up[:, :, 0, 0].double(), down.double())
        weight_shape = (out, inp, *kernel)

    w = LayerWeights(down, up, alpha)
    d = w.delta()
    assert w.rank == rank and w.scale == alpha / rank
    assert (w.in_features, w.out_features) == (inp, out)
    assert d.dtype == torch.float32 and tuple(d.shape) == weight_shape
    torch.testing.assert_close(d.double(), expected, rtol=1e-6, atol=1e-6)

    # the delta does to an input what the two factors do in sequence (LoRA's forward)
    x = torch.randn(2, inp, 5, 5, generator=g) if kernel else torch.randn(3, inp, generator=g)
    if kernel is None:
        seq = F.linear(F.linear(x, down.float()), up.float())
        full = F.linear(x, d)
    else:
        pad = (kernel[0] // 2, kernel[1] // 2)
        seq = F.conv2d(F.conv2d(x, down.float(), padding=pad), up.float())
        full = F.conv2d(x, d, padding=pad)
    torch.testing.assert_close(full, (alpha / rank) * seq, rtol=1e-4, atol=1e-5)


def test_delta_linear_factors_for_a_1x1_conv():
    """Linear factors (e.g. converted files) still give a matrix; 4-D 1x1 factors a 1x1 kernel."""
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    flat = LayerWeights(down, up, 1.0).delta()
    conv = LayerWeights(down[:, :, None, None], up[:, :, None, None], 1.0).delta()
    assert flat.shape == (6, 5) and conv.shape == (6, 5, 1, 1)
    assert torch.equal(conv[:, :, 0, 0], flat)
    assert not math.isclose(float(flat.abs().sum()), 0.0)


# -- 6. limits and labels -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_layer_limits_are_the_reference_unets(refs, arch):
    """The size caps the loader applies are what the full-size reference UNets have."""
    assert archs.layer_limits(refs(arch)) == archs.LAYER_LIMITS[arch]


def test_the_largest_layer_of_any_unet_at_full_rank_loads(tmp_path):
    """The caps refuse nothing real: SD's widest layer (ff GEGLU 1280 -> 10240) at rank 1280."""
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"
    lim = archs.any_arch_limits()
    rank = lim.max_weight // lim.max_out // 2
    t = {f"{k}.lora_down.weight": torch.full((rank, 1280), 1e-3, dtype=torch.float16),
         f"{k}.lora_up.weight": torch.full((10240, rank), 1e-3, dtype=torch.float16)}
    path = tmp_path / "wide.safetensors"
    save_file(t, str(path))
    assert load_spm(path).layers[k].down.shape == (rank, 1280)


def test_a_file_without_targets_is_labelled_ungated(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(tensors(md={**ZOO_MD, "prompts": " , "}))
    assert load_spm(path).ungated and load_spm(path).metadata.targets == []
    path.write_bytes(valid_bytes())
    assert not load_spm(path).ungated
    path.write_bytes(tensors(md={**ZOO_MD, "rank": "2", "spm_format": "1", "spm_slices": json.dumps(
        [{"name": "a", "concepts": ["cat"], "rank": 1}, {"name": "b", "concepts": [], "rank": 1}])}, rank=2))
    assert load_spm(path).ungated  # one slice acts on every prompt


def test_a_recipe_that_is_not_strict_json_is_refused_on_save(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(valid_bytes())
    spm = load_spm(path)
    spm.metadata.recipe = {"lr": float("nan")}
    with pytest.raises(SPMValueError, match="recipe"):
        spm.save(tmp_path / "y.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
