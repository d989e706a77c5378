"""Does an SPM fit a UNet, and where: one table of files through `placement`, with no session."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel
from models import tiny_sd1
from spm_helpers import hook_counts, random_spm

from lib_spm import ArchitectureMismatch, GateSettings, Session, SPMKeyError, UnresolvedKeysError
from lib_spm.format.names import layer_kind, layer_names, resolve
from lib_spm.format.spm_file import LayerWeights
from lib_spm.operations.lora_check import webui_lora_check
from lib_spm.runtime.placement import fit, placement

PROJ_IN = "down_blocks.0.attentions.0.proj_in"
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
MISSING = "lora_unet_down_blocks_7_attentions_0_proj_in"


def _key(model, path):
    return layer_names(model)[path].key


def _factors(model, path, kernel):
    """Rank-1 factors for the module at ``path`` with a ``kernel`` ((): 2-D, as a Linear's)."""
    m = model.get_submodule(path)
    i, o = (m.in_features, m.out_features) if layer_kind(m) == "linear" else (m.in_channels, m.out_channels)
    return LayerWeights(torch.ones(1, i, *kernel), torch.ones(o, 1, *((1, 1) if kernel else ())), 1.0)


def _set(path, kernel):
    def mutate(spm, model):
        spm.layers[_key(model, path)] = _factors(model, path, kernel)
        return _key(model, path)
    return mutate


def _widen(path):
    def mutate(spm, model):
        w = spm.layers[_key(model, path)]
        w.down = torch.zeros(w.down.shape[0], w.down.shape[1] * 2, *w.down.shape[2:])
        return _key(model, path)
    return mutate


def _add_missing(spm, model):
    spm.layers[MISSING] = next(iter(spm.layers.values()))
    return MISSING


@dataclass
class Case:
    name: str
    linear_proj: bool  # tiny SD1 with Linear (True) or 1x1 Conv2d (False) proj_in/proj_out
    mutate: Callable | None  # edits the file, returns the key it made interesting
    error: type | None  # what placement reports (and Session raises)
    problem: str | None = None  # the interesting key's problem, where it has one


CASES = [
    Case("fits-conv-proj", False, None, None),
    Case("fits-linear-proj", True, None, None),
    Case("wrong-shape", True, _widen(TO_K), ArchitectureMismatch, "SPM layer is 24->"),
    Case("missing-module", True, _add_missing, UnresolvedKeysError),
    Case("2d-factor-on-1x1-conv-fits", False, _set(PROJ_IN, ()), None),
    Case("1x1-conv-factor-on-linear-fits", True, _set(PROJ_IN, (1, 1)), None),
    Case("3x3-conv-factor-on-linear", True, _set(PROJ_IN, (3, 3)), ArchitectureMismatch,
         "a (3, 3) convolution factor on a Linear layer"),
    Case("3x3-factor-on-1x1-conv", False, _set(PROJ_IN, (3, 3)), ArchitectureMismatch,
         "does not fit Conv2d 8->8 kernel (1, 1)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_placement_names_each_layers_module_and_why_it_does_not_fit(case):
    model = tiny_sd1(case.linear_proj)
    spm = random_spm(model, ["circle"], name="c")
    key = case.mutate(spm, model) if case.mutate else None
    place = placement(spm, model)
    assert [p.key for p in place.layers] == list(spm.layers)  # every key, in file order
    assert place.fits == (case.error is None) and isinstance(place.error, case.error or type(None))
    resolvable = {k for k in spm.layers if k != MISSING}
    assert place.paths == resolve(sorted(resolvable), model)
    for p in place.layers:
        assert p.fits == (p.key != key or (case.problem is None and key != MISSING)), p.key
    if key == MISSING:
        assert next(p for p in place.layers if p.key == MISSING).path is None
        assert place.error.keys == [MISSING]
    if case.problem:
        bad = next(p for p in place.layers if p.key == key)
        assert case.problem in bad.problem
        assert str(place.error) == f"c @ {bad.path}: {bad.problem}"
    # the runtime refuses exactly what placement reports, and hooks nothing when it does
    session = Session(model, [(spm, 1.0)], gate=GateSettings(enabled=False))
    if case.error is None:
        with session:
            assert set(session.layer_paths) == set(place.paths.values())
    else:
        with pytest.raises(case.error) as e:
            session.attach()
        assert str(e.value) == str(place.error)
        assert hook_counts(model) == 0


def test_an_architecture_label_is_reported_before_the_shapes():
    tiny = tiny_sd1(True)
    spm = random_spm(tiny, ["circle"], name="c")
    spm.metadata.arch = "sdxl"
    assert placement(spm, tiny).fits  # the tiny model's text width names no architecture: shapes decide
    sd1_width = UNet2DConditionModel(  # tiny, but its cross-attention reads SD1's 768-wide text
        sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=2,
    )
    spm = random_spm(sd1_width, ["circle"], name="c")
    spm.metadata.arch = "sdxl"
    place = placement(spm, sd1_width)
    assert isinstance(place.error, ArchitectureMismatch) and str(place.error) == "c is an sdxl SPM; this UNet is sd1"
    assert all(p.fits for p in place.layers)  # where the layers would go is still listed
    spm.metadata.arch = "sd1"
    assert placement(spm, sd1_width).fits


def test_two_keys_for_one_module_are_a_key_error():
    model = tiny_sd1(True)
    spm = random_spm(model, ["circle"], name="c")
    name = layer_names(model)[TO_K]
    spm.layers[name.ldm_key] = spm.layers[name.key]
    place = placement(spm, model)
    assert isinstance(place.error, SPMKeyError) and "both name module" in str(place.error)
    with pytest.raises(SPMKeyError):
        place.check()


@pytest.mark.parametrize("module,kind,problem", [
    (nn.Linear(4, 3), "linear", None),
    (nn.Conv2d(4, 3, 1), "conv", None),
    (nn.Conv2d(4, 4, 1, groups=2), "conv", "grouped or non-zero-padded"),
    (nn.Conv2d(4, 3, 1, padding_mode="reflect"), "conv", "grouped or non-zero-padded"),
    (nn.Conv2d(4, 3, 3), "conv", "a linear factor on a (3, 3) convolution"),
    (nn.LayerNorm(4), None, "cannot adapt a LayerNorm"),
])
def test_fit_shapes_factors_for_each_kind_of_module(module, kind, problem):
    assert layer_kind(module) == kind
    w = LayerWeights(torch.ones(2, 4), torch.ones(3, 2), 1.0)  # 2-D factors 4 -> 3, rank 2
    if problem is None:
        down, up, conv = fit(module, w)
        assert down.shape[:2] == (2, 4) and up.shape[:2] == (3, 2) and (conv is None) == (kind == "linear")
    else:
        with pytest.raises(ArchitectureMismatch, match=re.escape(problem)):
            fit(module, w)


def test_lora_check_names_the_key_that_does_not_fit():
    from lib_spm.format import archs

    spm = random_spm(archs.reference_unet("sd1"), ["circle"], name="c", every=16)
    spm.metadata.arch = "sd1"
    ok, why = webui_lora_check(spm)
    assert ok and why == f"all {len(spm.layers)} layers resolve to sd1 modules with matching shapes"
    key = next(iter(spm.layers))
    w = spm.layers[key]
    w.down = torch.zeros(w.down.shape[0], w.down.shape[1] + 1, *w.down.shape[2:])
    ok, why = webui_lora_check(spm)
    assert not ok
    assert why == f"{key}: SPM layer (1, 321, 1, 1) / (320, 1, 1, 1) does not fit Conv2d 320->320 kernel (1, 1)"
