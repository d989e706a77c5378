"""What the WebUI's loaded model is: its UNet, a UNet call's conditioning, its architecture."""

from __future__ import annotations

import torch

from ...errors import SPMRuntimeError
from ...format import archs


def is_forge(sd_model) -> bool:
    """Whether this is a Forge diffusion engine (``backend.diffusion_engine.*``), which keeps its
    UNet, text encoders and VAE in ``forge_objects`` and has no ``.model``."""
    return getattr(sd_model, "forge_objects", None) is not None


def is_placeholder(sd_model) -> bool:
    """Forge's ``FakeInitialModel``: what ``shared.sd_model`` holds until the first generation
    loads the real model (``on_model_loaded`` fires then). It has no UNet to run."""
    return type(sd_model).__name__ == "FakeInitialModel"


def unet_of(sd_model) -> torch.nn.Module:
    """The LDM/sgm ``UNetModel`` the WebUI denoises with (Forge: its ``IntegratedUNet2DConditionModel``,
    whose module objects persist across generations; a checkpoint change builds a new one)."""
    if is_placeholder(sd_model):
        raise SPMRuntimeError("Forge has not loaded a model yet (it loads one at the first generation): "
                              "generate an image first")
    if is_forge(sd_model):
        try:
            return sd_model.forge_objects.unet.model.diffusion_model
        except AttributeError:
            raise SPMRuntimeError("this Forge model has no forge_objects.unet.model.diffusion_model") from None
    try:
        return sd_model.model.diffusion_model
    except AttributeError:
        raise SPMRuntimeError("this model has no model.diffusion_model: not a WebUI Stable Diffusion model") from None


def alphas_cumprod_of(sd_model):
    """The noise schedule: the WebUI's ``sd_model.alphas_cumprod``, Forge's predictor's."""
    owner = sd_model.forge_objects.unet.model.predictor if is_forge(sd_model) else sd_model
    acp = getattr(owner, "alphas_cumprod", None)
    if acp is None:
        raise SPMRuntimeError("this model has no alphas_cumprod (not a DDPM-style noise schedule)")
    return acp


def conditioning_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The text conditioning of ``UNetModel.forward(x, timesteps=None, context=None, y=None)``."""
    ctx = kwargs.get("context")
    if ctx is None and len(args) >= 3:
        ctx = args[2]
    if not isinstance(ctx, torch.Tensor):
        raise SPMRuntimeError("this UNet call has no text conditioning (context)")
    return ctx


def model_arch(sd_model) -> str | None:
    """The loaded model's architecture: the flags ``sd_models.set_model_type`` sets, else what
    :func:`lib_spm.format.archs.unet_arch` reads from its UNet."""
    for attr, arch in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(sd_model, attr, False) is True:
            return arch
    return archs.unet_arch(unet_of(sd_model))


def model_kind(sd_model) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` for a model SPMs can be trained on; refuses anything else.

    :func:`model_arch` answers "which architecture"; training also needs a plain 4-channel
    text-to-image UNet, which SD3, SSD-1B, InstructPix2Pix and inpainting models are not.
    """
    if getattr(sd_model, "is_sd3", False):
        raise SPMRuntimeError("SPM training supports SD1.x, SD2.x and SDXL UNets; the loaded model is SD3")
    if getattr(sd_model, "is_ssd", False):
        raise SPMRuntimeError("SPM training does not support SSD-1B (a pruned SDXL); load an SD1.x, SD2.x or SDXL model")
    if getattr(sd_model, "cond_stage_key", None) == "edit":
        raise SPMRuntimeError("SPM training does not support InstructPix2Pix models; load a text-to-image model")
    unet = unet_of(sd_model)
    conv = next((m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is None or conv.in_channels != 4:
        got = "no input convolution" if conv is None else f"{conv.in_channels} input channels"
        raise SPMRuntimeError(f"SPM training needs a 4-channel text-to-image UNet; this one has {got} "
                              "(an inpainting model?)")
    arch = model_arch(sd_model)
    if arch is not None:
        return arch
    raise SPMRuntimeError(f"unknown model type ({type(sd_model).__name__}): SPM training supports SD1.x, SD2.x "
                          "and SDXL")


def parameterization_of(sd_model) -> str:
    """``eps`` or ``v``: the WebUI's ``sd_model.parameterization``, Forge's predictor's ``prediction_type``."""
    if is_forge(sd_model):
        kind = getattr(sd_model.forge_objects.unet.model.predictor, "prediction_type", "epsilon")
        return {"epsilon": "eps", "eps": "eps", "v_prediction": "v"}.get(kind, kind)
    return getattr(sd_model, "parameterization", "eps")


def compute_dtype_of(sd_model, unet: torch.nn.Module) -> torch.dtype:
    """The dtype the UNet computes in: Forge's ``computation_dtype`` (its weights may be stored
    in fp8/NF4/GGUF), else its first parameter's."""
    if is_forge(sd_model):
        dtype = getattr(sd_model.forge_objects.unet.model, "computation_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return next(unet.parameters()).dtype
