"""The trainer's :class:`~lib_spm.training.trainer.Backend` for the model loaded in AUTOMATIC1111 (v1.10.1).

Duck-typed on ``sd_model`` (``shared.sd_model``); nothing from the WebUI is imported at module
level. What it relies on, read from the WebUI's source:

- ``sd_model.model.diffusion_model`` is the ldm/sgm ``UNetModel``:
  ``forward(x, timesteps=None, context=None, y=None)``; SDXL's ``y`` is the [B, 2816] vector;
- ``sd_model.get_learned_conditioning(texts)``: [B, 77k, C] for SD1/SD2, and for SDXL a dict
  ``{"crossattn": [B, 77k, 2048], "vector": [B, 2816]}`` whose size conditioning comes from the
  batch's ``width``/``height`` attributes (``sd_models_xl.get_learned_conditioning``; a plain list
  means 1024 px), so prompts are passed as a list carrying the training resolution;
- ``sd_model.alphas_cumprod``; ``sd_model.parameterization == "v"`` for v-prediction models
  (Forge: ``forge_objects.unet.model.predictor``'s ``alphas_cumprod`` and ``prediction_type``; its
  UNet is loaded onto the GPU with ``backend.memory_management.load_model_gpu`` first);
- ``sd_model.decode_first_stage(latents)`` gives images in [-1, 1];
- ``is_sd1``/``is_sd2``/``is_sdxl``/``is_ssd``/``is_sd3`` (``sd_models.set_model_type``), and
  ``lowvram`` when ``--medvram``/``--lowvram`` move the UNet in and out of the GPU per call of
  ``sd_model.model`` (which a direct UNet call never triggers).

The UNet is often fp16 on CUDA: calls run under the WebUI's own ``devices.autocast()`` (or
``torch.autocast`` on a bare CUDA fp16 model), inputs in the UNet's dtype, predictions returned
in fp32; the trainable adapter stays fp32 (its hook casts its factors to each layer's dtype).
"""

from __future__ import annotations

import contextlib

import torch

from ...errors import SPMRuntimeError, SPMShapeError, SPMValueError
from ...training.schedule import eps_from_v
from ...training.trainer import Conditioning
from .gateway import forge, webui
from .model import alphas_cumprod_of, compute_dtype_of, is_forge, model_kind, parameterization_of, unet_of
from .rows import CHUNK


class _Prompts(list):
    """Texts with the size SDXL's conditioner reads (what ``prompt_parser.SdConditioning`` carries)."""

    def __init__(self, texts, width: int, height: int):
        super().__init__(texts)
        self.width, self.height = width, height
        self.is_negative_prompt = False


class WebUIBackend:
    """Fits :class:`~lib_spm.training.trainer.Backend`: trains on the WebUI's loaded model, unchanged.

    ``previews=False``: no ``decode`` (the job then makes no preview images)."""

    def __init__(self, sd_model, resolution: int = 512, *, previews: bool = True):
        if resolution < 64 or resolution % 8:
            raise SPMValueError(f"resolution must be a multiple of 8 and at least 64, not {resolution}")
        self.arch = model_kind(sd_model)
        if getattr(sd_model, "lowvram", False):
            raise SPMRuntimeError("training needs the whole UNet on the GPU: restart the WebUI without "
                                  "--medvram/--lowvram (or --medvram-sdxl for SDXL)")
        self.parameterization = parameterization_of(sd_model)
        if self.parameterization not in ("eps", "v"):
            raise SPMRuntimeError(f"unsupported parameterization {self.parameterization!r} (eps or v)")
        self.sd_model = sd_model
        self.unet = unet_of(sd_model)
        if is_forge(sd_model):
            with contextlib.suppress(ImportError):  # Forge keeps the UNet off the GPU between generations
                forge("memory_management").load_model_gpu(sd_model.forge_objects.unet)
            _leave_inference_mode(self.unet)
        self.device = next(self.unet.parameters()).device
        self.dtype = compute_dtype_of(sd_model, self.unet)
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod_of(sd_model)).detach().float().to(self.device)
        self.resolution = resolution
        self.latent_shape = (4, resolution // 8, resolution // 8)
        if not previews:
            self.decode = None  # the job checks callable(backend.decode)

    def _precision(self):
        """The WebUI's autocast; without the WebUI, torch's on a half-precision CUDA UNet."""
        try:
            return webui("devices").autocast()
        except ImportError:
            if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
                return torch.autocast("cuda", dtype=self.dtype)
            return contextlib.nullcontext()

    def _saved_tensors(self):
        """Forge's transformer blocks add in place (``x += n``) to activations that autograd saved
        (``norm1(x)``), which backward then refuses: save copies of intermediate activations
        there (weights and inputs, which nothing modifies, are kept as they are)."""
        if not is_forge(self.sd_model) or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(_copy_activation, _same)

    def encode(self, prompts: list[str]) -> Conditioning:
        """One 77-token chunk per prompt (as the original trainer sees it): rows of any two
        prompts must stack, and a concept longer than 75 tokens keeps its first chunk."""
        batch = _Prompts(prompts, self.resolution, self.resolution)
        with torch.no_grad(), self._precision():
            cond = self.sd_model.get_learned_conditioning(batch)
        if self.arch == "sdxl":
            if not isinstance(cond, dict) or "crossattn" not in cond or "vector" not in cond:
                raise SPMShapeError("this SDXL model's get_learned_conditioning gave no crossattn/vector dict")
            ctx, added = cond["crossattn"], {"vector": cond["vector"].to(self.device)}
        else:
            if not isinstance(cond, torch.Tensor):
                raise SPMShapeError(f"get_learned_conditioning gave a {type(cond).__name__}, not a tensor")
            ctx, added = cond, None
        if ctx.dim() != 3 or ctx.shape[0] != len(prompts):
            raise SPMShapeError(f"get_learned_conditioning gave {tuple(ctx.shape)} for {len(prompts)} prompts")
        # clone: Forge encodes under inference mode, and inference tensors cannot be saved for backward
        added = None if added is None else {k: v.clone() for k, v in added.items()}
        return Conditioning(ctx[:, :CHUNK].to(self.device).clone(), added)

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        kw = {"context": cond.context.to(self.dtype)}
        if cond.added is not None:
            kw["y"] = cond.added["vector"].to(self.dtype)
        with self._precision(), self._saved_tensors():
            out = self.unet(x.to(self.dtype), t, **kw)
        out = out.float()
        if self.parameterization == "eps":
            return out
        return eps_from_v(out, x.float(), self.alphas_cumprod, t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> [B, 3, H, W] in [0, 1] through the WebUI's VAE."""
        with torch.no_grad(), self._precision():
            images = self.sd_model.decode_first_stage(latents.to(self.device))
        return ((images.float() + 1) / 2).clamp(0, 1)


def _leave_inference_mode(unet: torch.nn.Module) -> None:
    """Make the UNet's inference tensors normal ones, same values (Forge loads its model under
    ``torch.inference_mode``, and autograd cannot save inference tensors for backward: a
    LayerNorm's weight, a frozen layer's input). One tensor at a time, so memory grows by the
    largest one only; generation is unchanged."""
    with torch.inference_mode(False), torch.no_grad():
        for module in unet.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_inference():
                    setattr(module, name, torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                if b.is_inference():
                    setattr(module, name, b.clone())  # a registered buffer stays one, persistence kept


def _copy_activation(t: torch.Tensor) -> torch.Tensor:
    return t if t.grad_fn is None else t.clone()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t
