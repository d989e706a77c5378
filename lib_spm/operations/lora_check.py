"""Will a file load in the WebUI's built-in Lora as a plain LoRA? Checked against the real
full-size architecture (a meta-device reference UNet), through the same name resolution the
tests verify against the WebUI's own mapping (tests/fixtures)."""

from __future__ import annotations

from functools import lru_cache

from ..errors import ArchitectureMismatch
from ..format import archs
from ..format.spm_file import SPMFile
from ..runtime.placement import placement


@lru_cache(maxsize=3)
def _reference(arch: str):
    return archs.reference_unet(arch)


def webui_lora_check(spm: SPMFile) -> tuple[bool, str]:
    """(loads, why): every key must name a layer of the architecture's UNet with the right shape."""
    if spm.arch is None:
        return False, "architecture unknown (its text width matches no SD1/SD2/SDXL model)"
    try:
        unet = _reference(spm.arch)
    except ImportError:
        return False, "cannot check: diffusers is not installed"
    place = placement(spm.layers, unet)  # the layers alone: the label is what chose this UNet
    misfit = next((p for p in place.layers if p.problem), None)
    if isinstance(place.error, ArchitectureMismatch) and misfit:  # named by the file's key, as a user reads it
        return False, f"{misfit.key}: {misfit.problem}"
    if place.error is not None:
        return False, str(place.error)
    return True, f"all {len(place.layers)} layers resolve to {spm.arch} modules with matching shapes"
