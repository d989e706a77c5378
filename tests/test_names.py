"""Layer names (lib_spm.format.names) against the real WebUI v1.10.1 ground truth in tests/fixtures.

Three independent sources are cross-checked:
- our structural derivation (``layer_names``/``resolve``) run on the full-size diffusers reference
  UNet, on the WebUI's real LDM module tree (``models.ldm_tree``) and on tiny diffusers UNets;
- the WebUI's module list and ``network_layer_mapping`` as recorded from a running WebUI;
- ``webui_resolve`` below: a transcription of how the built-in Lora (extensions-builtin/Lora/
  networks.py, v1.10.1) turns a kohya key stem into a network layer name. Its hard-coded
  three-blocks-per-level arithmetic is only valid for SD1.x/SD2.x/SDXL, which is all it is used for.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import pytest
import torch.nn as nn
from models import FIXTURES, ldm_tree, tiny_sd1, tiny_sdxl

from lib_spm.errors import SPMError, SPMKeyError, UnresolvedKeysError
from lib_spm.format.archs import reference_unet
from lib_spm.format.names import LayerName, layer_names, resolve, spm_layer_paths

TAGS = ("sd15", "sdxl")
ARCH = {"sd15": "sd1", "sdxl": "sdxl"}
ROOT = "model.diffusion_model."
ADAPTABLE = (nn.Linear, nn.Conv2d)


# -- the oracle: the WebUI's documented lookup order ----------------------------------------------

_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def convert_diffusers_name_to_compvis(stem: str) -> str:
    """The UNet rules of networks.convert_diffusers_name_to_compvis (prefix matches, first wins)."""

    def m(rx):
        r = re.match(rx, stem)
        return None if r is None else [int(g) if g.isdigit() else g for g in r.groups()]

    if (g := m(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{g[0]}"
    if (g := m(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{g[0]}"
    if (g := m(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{g[0] * 2 - 2}{g[1]}"
    if (g := m(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        return f"diffusion_model_input_blocks_{1 + g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if (g := m(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET.get(g[2], g[2]) if g[0] == "resnets" else g[2]
        return f"diffusion_model_middle_block_{1 if g[0] == 'attentions' else g[1] * 2}_{suffix}"
    if (g := m(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        return f"diffusion_model_output_blocks_{g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if (g := m(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + g[0] * 3}_0_op"
    if (g := m(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + g[0] * 3}_{2 if g[0] > 0 else 1}_conv"
    return stem


def webui_resolve(stem: str, mapping: dict[str, str]) -> str | None:
    """The network layer name the WebUI finds for a kohya UNet key stem, or None."""
    key = convert_diffusers_name_to_compvis(stem)
    if key in mapping:
        return key
    if "lora_unet" in stem:
        key = stem.replace("lora_unet", "diffusion_model")
        if key in mapping:
            return key
    return None


def test_oracle_reproduces_recorded_lookup_steps():
    """The oracle is checked against what the real WebUI did, step by step, before it is trusted."""
    checked = 0
    for tag in TAGS:
        fx = fixtures(tag)
        for ex in fx.examples:
            if not ex["kohya_key"].startswith("lora_unet_"):
                continue
            steps = dict(ex["lookup_steps"])
            assert convert_diffusers_name_to_compvis(ex["kohya_key"]) == steps["convert_diffusers_name_to_compvis"]
            assert webui_resolve(ex["kohya_key"], fx.mapping) == ex["network_layer_name"]
            checked += 1
    assert checked >= 9


# -- fixtures ---------------------------------------------------------------------------------------

class Fx:
    def __init__(self, tag: str):
        mods = json.loads((FIXTURES / f"ldm_unet_modules_{tag}.json").read_text())
        self.meta = mods["meta"]
        self.modules = {m["name"]: m for m in mods["modules"]}
        self.mapping = json.loads((FIXTURES / f"lora_layer_mapping_{tag}.json").read_text())
        ex = json.loads((FIXTURES / f"lora_key_examples_{tag}.json").read_text())
        self.examples = ex["examples"]
        self.unresolved = ex["unresolved"]
        self.adaptable = {n: m for n, m in self.modules.items() if m["class"] in ("Linear", "Conv2d")}


@lru_cache(maxsize=None)
def fixtures(tag: str) -> Fx:
    return Fx(tag)


@lru_cache(maxsize=None)
def ref(tag: str) -> nn.Module:
    return reference_unet(ARCH[tag])


@lru_cache(maxsize=None)
def ldm(tag: str) -> nn.Module:
    return ldm_tree(tag)


@lru_cache(maxsize=None)
def ref_names(tag: str) -> dict[str, LayerName]:
    return layer_names(ref(tag))


@lru_cache(maxsize=None)
def ldm_names(tag: str) -> dict[str, LayerName]:
    return layer_names(ldm(tag))


def weight_shape(m: nn.Module) -> list[int]:
    return list(m.weight.shape)


def rank1_params(m: nn.Module) -> int:
    return m.in_features + m.out_features if isinstance(m, nn.Linear) else m.in_channels + m.out_channels


# -- 1. the full-size reference UNet against the WebUI's real module list -------------------------

@pytest.mark.parametrize("tag", TAGS)
def test_mapping_value_format(tag):
    """network_layer_mapping values are qualified names from the sd_model: UNet under ROOT."""
    fx = fixtures(tag)
    unet_entries = {k: v for k, v in fx.mapping.items() if k.startswith("diffusion_model_")}
    assert len(unet_entries) == len(fx.modules) - 1  # every UNet module but the root
    for name, m in fx.modules.items():
        if name:
            assert fx.mapping[m["network_layer_name"]] == ROOT + name


@pytest.mark.parametrize("tag", TAGS)
def test_every_reference_layer_is_a_real_webui_module(tag):
    fx, unet, names = fixtures(tag), ref(tag), ref_names(tag)
    adaptable = {p: m for p, m in unet.named_modules() if isinstance(m, ADAPTABLE)}
    assert set(names) == set(adaptable), "layer_names skipped or invented a Linear/Conv2d"
    for path, name in names.items():
        assert name.path == name.diffusers == path
        got = fx.modules.get(name.ldm)
        assert got is not None, f"{path} -> {name.ldm}: no such WebUI module"
        assert got["class"] == type(adaptable[path]).__name__, path
        assert got["params"]["weight"] == weight_shape(adaptable[path]), path
        assert ("bias" in got["params"]) == (adaptable[path].bias is not None), path
        assert name.webui_name == got["network_layer_name"], path
        assert fx.mapping[name.webui_name] == ROOT + name.ldm


@pytest.mark.parametrize("tag", TAGS)
def test_spm_layer_keys_resolve_in_the_webui_to_our_module(tag):
    """Every SPM layer: the WebUI's own lookup of our key (either lora_unet dialect) lands on our module."""
    fx, names = fixtures(tag), ref_names(tag)
    paths = spm_layer_paths(ref(tag))
    assert paths
    for path in paths:
        name = names[path]
        for stem in (name.key, name.ldm_key):
            got = webui_resolve(stem, fx.mapping)
            assert got == name.webui_name, f"{stem}: WebUI finds {got}, we say {name.webui_name}"
            assert fx.mapping[got] == ROOT + name.ldm


@pytest.mark.parametrize("tag", TAGS)
def test_webui_never_resolves_our_keys_to_another_module(tag):
    """For every Linear/Conv2d (not only SPM layers) the WebUI either finds our module or nothing."""
    fx = fixtures(tag)
    unresolved = set()
    for name in ref_names(tag).values():
        assert webui_resolve(name.ldm_key, fx.mapping) == name.webui_name, name.ldm_key
        got = webui_resolve(name.key, fx.mapping)
        if got is None:
            unresolved.add(name.diffusers)
        else:
            assert got == name.webui_name, f"{name.key}: WebUI finds {got}, we say {name.webui_name}"
    # What the WebUI's diffusers-key rules do not cover: SDXL's add_embedding, and its hard-coded
    # "up_blocks.0 has no attentions" upsampler index (true for SD1, false for SDXL). No SPM layer.
    expected = set() if tag == "sd15" else {
        "add_embedding.linear_1", "add_embedding.linear_2", "up_blocks.0.upsamplers.0.conv"}
    assert unresolved == expected


# -- 2. coverage is total ---------------------------------------------------------------------------

@pytest.mark.parametrize("tag", TAGS)
def test_every_webui_layer_is_reached(tag):
    fx = fixtures(tag)
    assert len(fx.adaptable) == fx.meta["n_linear"] + fx.meta["n_conv2d"]
    assert len(fx.adaptable) == {"sd15": 282, "sdxl": 794}[tag]
    reached = [n.ldm for n in ref_names(tag).values()]
    assert len(reached) == len(set(reached)), "two diffusers layers named one LDM layer"
    assert set(reached) == set(fx.adaptable), sorted(set(fx.adaptable) ^ set(reached))[:10]
    assert {n.webui_name for n in ref_names(tag).values()} == {
        m["network_layer_name"] for m in fx.adaptable.values()}


# -- 3. both directions: the LDM tree gives back the same pairs -------------------------------------

@pytest.mark.parametrize("tag", TAGS)
def test_ldm_tree_and_diffusers_unet_give_the_same_pairs(tag):
    from_ldm, from_diffusers = ldm_names(tag), ref_names(tag)
    assert set(from_ldm) == set(fixtures(tag).adaptable)
    for path, name in from_ldm.items():
        assert name.path == name.ldm == path
    pairs_ldm = {(n.diffusers, n.ldm) for n in from_ldm.values()}
    pairs_diff = {(n.diffusers, n.ldm) for n in from_diffusers.values()}
    assert pairs_ldm == pairs_diff, sorted(pairs_ldm ^ pairs_diff)[:10]


@pytest.mark.parametrize("tag", TAGS)
def test_ldm_tree_layers_match_reference_structure(tag):
    """The (shrunk) LDM layer and the diffusers layer it names have the same kind, kernel and stride."""
    unet, tree = ref(tag), ldm(tag)
    for path, name in ldm_names(tag).items():
        a, b = tree.get_submodule(path), unet.get_submodule(name.diffusers)
        assert type(a) is type(b), path
        if isinstance(a, nn.Conv2d):
            assert (a.kernel_size, a.stride, a.padding) == (b.kernel_size, b.stride, b.padding), path
        # widths are divided by 64 in the tree (4 latent channels kept)
        shrink = lambda d: max(d // 64, 1) if d >= 64 else d  # noqa: E731
        assert list(a.weight.shape[:2]) == [shrink(d) for d in b.weight.shape[:2]], path


# -- 4. the WebUI's recorded kohya key examples -----------------------------------------------------

def _unet_examples(tag):
    return [ex for ex in fixtures(tag).examples if ex["kohya_key"].startswith("lora_unet_")]


EXAMPLES = [(tag, ex["kohya_key"]) for tag in TAGS for ex in _unet_examples(tag)]


def test_examples_cover_the_interesting_kinds():
    keys = [k for _, k in EXAMPLES]
    for part in ("resnets", "downsamplers", "mid_block_resnets", "proj_out", "lora_unet_input_blocks",
                 "lora_unet_middle_block", "lora_unet_output_blocks"):
        assert any(part in k for k in keys), part


@pytest.mark.parametrize("tag,key", EXAMPLES, ids=[f"{t}-{k}" for t, k in EXAMPLES])
def test_recorded_example_resolves_to_the_webui_module(tag, key):
    ex = next(e for e in fixtures(tag).examples if e["kohya_key"] == key)
    assert ex["agrees"] and ex["module_qualified_name"].startswith(ROOT)
    want_ldm = ex["module_qualified_name"][len(ROOT):]
    # on the diffusers UNet
    path = resolve([key], ref(tag))[key]
    name = ref_names(tag)[path]
    assert name.ldm == want_ldm
    assert name.webui_name == ex["network_layer_name"]
    assert type(ref(tag).get_submodule(path)).__name__ == ex["module_class"]
    w = weight_shape(ref(tag).get_submodule(path))  # [out, in, *kernel]
    assert (w[1], w[0]) == (ex["shape"]["in"], ex["shape"]["out"])
    assert w[2:] == ex["shape"].get("kernel", [])
    # on the WebUI's own module tree
    assert resolve([key], ldm(tag)) == {key: want_ldm}


def test_two_dialects_of_one_module_are_refused():
    """The SDXL examples hold one module under both kohya dialects; the WebUI silently merges them
    (later keys overwrite), we refuse the file."""
    by_module = {}
    for ex in _unet_examples("sdxl"):
        by_module.setdefault(ex["module_qualified_name"], []).append(ex["kohya_key"])
    pairs = [keys for keys in by_module.values() if len(keys) > 1]
    assert pairs == [["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
                      "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"]]
    for unet in (ref("sdxl"), ldm("sdxl")):
        with pytest.raises(SPMKeyError, match="both name module"):
            resolve(pairs[0], unet)
        with pytest.raises(SPMKeyError):
            resolve(pairs[0][::-1], unet)
        # each alone resolves
        assert len({resolve([k], unet)[k] for k in pairs[0]}) == 1


@pytest.mark.parametrize("tag", TAGS)
def test_all_three_dialects_of_one_module_collide(tag):
    name = ref_names(tag)[spm_layer_paths(ref(tag))[0]]
    for i in range(3):
        for j in range(3):
            if i != j:
                with pytest.raises(SPMKeyError):
                    resolve([name.dialects()[i], name.dialects()[j]], ref(tag))


# -- 5. totality and loudness -----------------------------------------------------------------------

@pytest.mark.parametrize("tag", TAGS)
def test_unknown_keys_are_listed_exactly(tag):
    names = list(ref_names(tag).values())
    good = [names[0].key, names[len(names) // 2].ldm_key, names[-1].webui_name]
    bad = [
        "lora_unet_down_blocks_9_attentions_0_proj_in",  # no such block
        names[0].key + "_extra",  # a valid key with a tail
        "lora_unet_down_blocks_1_attentions_0",  # a container, not a layer
        names[0].key.replace("lora_unet_", "lora_unet_lora_unet_"),
        "lora_unet_down_blocks.1.attentions.0.proj_in",  # dotted, not a key
        names[0].key.upper(),
    ]
    keys = [bad[0], good[0], bad[1], bad[2], good[1], bad[3], bad[4], good[2], bad[5]]
    with pytest.raises(UnresolvedKeysError) as exc:
        resolve(keys, ref(tag))
    assert exc.value.keys == bad
    assert isinstance(exc.value, SPMError)
    assert str(len(bad)) in str(exc.value) and bad[0] in str(exc.value)
    # the valid ones alone resolve
    assert set(resolve(good, ref(tag))) == set(good)


@pytest.mark.parametrize("tag", TAGS)
def test_text_encoder_keys_are_not_resolved(tag):
    fx = fixtures(tag)
    te = [ex["kohya_key"] for ex in fx.examples if not ex["kohya_key"].startswith("lora_unet_")]
    assert te and all(k.startswith("lora_te") for k in te)
    # also the WebUI's own network layer names of text-encoder modules
    te += [k for k in fx.mapping if not k.startswith("diffusion_model")][:50:7]
    for unet in (ref(tag), ldm(tag)):
        with pytest.raises(UnresolvedKeysError) as exc:
            resolve(te, unet)
        assert exc.value.keys == te


def test_resolve_of_nothing_is_nothing():
    assert resolve([], ref("sd15")) == {}


def test_many_unknown_keys_message_is_short():
    bad = [f"lora_unet_nope_{i}" for i in range(40)]
    with pytest.raises(UnresolvedKeysError) as exc:
        resolve(bad, ref("sd15"))
    assert exc.value.keys == bad
    assert "35 more" in str(exc.value) and "nope_39" not in str(exc.value)


# -- 6. SPM layer counts and sizes ------------------------------------------------------------------

@pytest.mark.parametrize("tag,n,params", [("sd15", 192, 423_936), ("sdxl", 722, 2_659_840)])
def test_spm_layer_counts(tag, n, params):
    unet = ref(tag)
    paths = spm_layer_paths(unet)
    assert len(paths) == len(set(paths)) == n
    assert sum(rank1_params(unet.get_submodule(p)) for p in paths) == params
    # same layers seen from the WebUI's tree
    tree_paths = spm_layer_paths(ldm(tag))
    assert sorted(tree_paths) == sorted(ref_names(tag)[p].ldm for p in paths)
    assert sorted(ldm_names(tag)[p].diffusers for p in tree_paths) == sorted(paths)
    # and from the fixture: everything under a SpatialTransformer
    containers = [k for k, m in fixtures(tag).modules.items() if m["class"] == "SpatialTransformer"]
    under = {k for k in fixtures(tag).adaptable if any(k.startswith(c + ".") for c in containers)}
    assert under == set(tree_paths)


@pytest.mark.parametrize("tag,proj", [("sd15", nn.Conv2d), ("sdxl", nn.Linear)])
def test_proj_in_out_kind(tag, proj):
    unet = ref(tag)
    projs = [p for p in spm_layer_paths(unet) if p.endswith(("proj_in", "proj_out"))]
    assert len(projs) == 2 * {"sd15": 16, "sdxl": 11}[tag]
    for p in projs:
        m = unet.get_submodule(p)
        assert type(m) is proj, p
        if proj is nn.Conv2d:
            assert m.kernel_size == (1, 1), p
        assert fixtures(tag).modules[ref_names(tag)[p].ldm]["class"] == proj.__name__


# -- 7. tiny models: both ways, all dialects --------------------------------------------------------

TINY = {"sd1": lambda: tiny_sd1(False), "sd1_linear": lambda: tiny_sd1(True), "sdxl": tiny_sdxl}

_KIND = {"resnets": "ResBlock", "attentions": "SpatialTransformer",
         "downsamplers": "Downsample", "upsamplers": "Upsample"}


def _natural(path: str):
    return [int(p) if p.isdigit() else -1 for p in path.split(".")], path


def ldm_skeleton(unet: nn.Module, names: dict[str, LayerName]) -> nn.Module:
    """An LDM-named module tree holding a copy of each layer at our LDM path, with the containers'
    WebUI class names taken from the diffusers block each came from; children in index order."""
    classes: dict[str, type] = {}

    def container(cls_name):
        if cls_name not in classes:
            classes[cls_name] = type(cls_name, (nn.Module,), {"__iter__": lambda s: iter(s._modules.values())})
        return classes[cls_name]()

    root = container("UNetModel")
    for name in sorted(names.values(), key=lambda n: _natural(n.ldm)):
        parts = name.ldm.split(".")
        dparts = name.diffusers.split(".")
        block_kind = next((_KIND[p] for p in dparts if p in _KIND), None)
        node = root
        for depth, part in enumerate(parts[:-1]):
            if part not in node._modules:
                in_blocks = parts[0] in ("input_blocks", "output_blocks")
                is_block = (in_blocks and depth == 2) or (parts[0] == "middle_block" and depth == 1)
                node.add_module(part, container(block_kind if is_block else "Container"))
            node = node._modules[part]
        node.add_module(parts[-1], unet.get_submodule(name.diffusers))
    return root


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
    unet = TINY[request.param]()
    return request.param, unet, layer_names(unet)


def test_tiny_names_are_injective_and_total(tiny):
    _, unet, names = tiny
    adaptable = [p for p, m in unet.named_modules() if isinstance(m, ADAPTABLE)]
    assert sorted(names) == sorted(adaptable)
    ldm_to_diff = {n.ldm: n.diffusers for n in names.values()}
    assert len(ldm_to_diff) == len(names), "two layers share an LDM name"
    all_dialects = [d for n in names.values() for d in n.dialects()]
    assert len(set(all_dialects)) == 3 * len(names), "a key string names two layers"


def test_tiny_round_trip_through_ldm(tiny):
    """diffusers -> ldm (our names) -> an LDM tree with those names -> diffusers again."""
    tag, unet, names = tiny
    back = layer_names(ldm_skeleton(unet, names))
    assert {n.ldm: n.diffusers for n in back.values()} == {n.ldm: n.diffusers for n in names.values()}


def test_tiny_resolve_all_dialects(tiny):
    _, unet, names = tiny
    for i in range(3):
        keys = [n.dialects()[i] for n in names.values()]
        assert resolve(keys, unet) == {n.dialects()[i]: p for p, n in names.items()}


def test_tiny_blocks_follow_structure(tiny):
    """Block numbers follow each model's own structure, not SD1's."""
    tag, unet, names = tiny
    got = {n.diffusers: n.ldm for n in names.values()}
    want = {
        "sd1": {  # 1 resnet per level: input_blocks 1 (res+attn), 2 (downsample), 3 (res)
            "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
            "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
            "down_blocks.1.resnets.0.conv1": "input_blocks.3.0.in_layers.2",
            "up_blocks.0.upsamplers.0.conv": "output_blocks.1.1.conv",
            "up_blocks.1.attentions.1.proj_out": "output_blocks.3.1.proj_out",
            "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        },
        "sdxl": {
            "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
            "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k":
                "input_blocks.8.1.transformer_blocks.1.attn2.to_k",
            "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
            "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
            "add_embedding.linear_2": "label_emb.0.2",
        },
    }[tag.replace("_linear", "")]
    for d, l in want.items():
        assert got[d] == l, d


# -- a file this project saves, read the way the built-in Lora reads it --------------------------

@pytest.mark.parametrize("tag,arch", [("sd15", "sd1"), ("sdxl", "sdxl")])
def test_saved_file_loads_in_the_builtin_lora(tag, arch, tmp_path):
    """networks.load_network: partition each key at its first dot, resolve the stem, and build a
    NetworkModuleLora from lora_up/lora_down (+alpha); every key must land on a module of the
    right shape, and the ss_* metadata must label the file with the right architecture."""
    from safetensors import safe_open

    from lib_spm import load_spm
    from lib_spm.format.zoo import write_zoo_file

    src = tmp_path / "zoo.safetensors"
    write_zoo_file(src, ref(tag), ["snoopy"], rank=2, alpha=1.0)
    spm = load_spm(src)
    spm.metadata.name = "no_snoopy"
    out = spm.save(tmp_path / "ours.safetensors")
    fx = fixtures(tag)
    modules = fx.modules
    with safe_open(str(out), "pt") as f:
        keys, md = list(f.keys()), f.metadata()
        parts: dict[str, set] = {}
        for key in keys:
            stem, _, part = key.partition(".")
            target = webui_resolve(stem, fx.mapping)
            assert target is not None, key
            parts.setdefault(target, set()).add(part)
            m = modules[fx.mapping[target][len(ROOT):]]
            if part == "lora_down.weight":
                assert f.get_tensor(key).shape[1] == weight_shape_of(m)[1]
            elif part == "lora_up.weight":
                assert f.get_tensor(key).shape[0] == weight_shape_of(m)[0]
    assert all(p == {"lora_down.weight", "lora_up.weight", "alpha"} for p in parts.values())
    assert len(parts) == len(spm.layers)
    assert md["ss_base_model_version"].startswith("sdxl_") == (arch == "sdxl")
    assert md["ss_output_name"] == "no_snoopy" and md["ss_network_dim"] == "2"


def weight_shape_of(fixture_module: dict) -> list[int]:
    return fixture_module["params"]["weight"]


def test_one_place_tells_what_a_unet_is():
    """archs answers for any UNet: its architecture by cross-attention width, its module layout."""
    from lib_spm.format.archs import unet_arch, unet_layout

    for tag in TAGS:  # the reference UNets the other tests build too (cached)
        assert (unet_arch(ref(tag)), unet_layout(ref(tag))) == (ARCH[tag], "diffusers")
    assert unet_layout(ldm("sd15")) == "ldm" and unet_arch(ldm("sd15")) is None  # widths shrunk: 768 / 64
    assert unet_arch(tiny_sd1()) is None  # a width none of ours has
    with pytest.raises(SPMKeyError, match="neither a diffusers nor an LDM UNet"):
        unet_layout(nn.Linear(2, 2))
