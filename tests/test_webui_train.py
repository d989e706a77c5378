"""The WebUI training backend against a stand-in ``sd_model`` with the LDM calling convention.

The stand-in's UNet is a tiny diffusers UNet answering ``forward(x, timesteps, context, y=None)``
(SDXL's ``y`` split back into the diffusers added inputs), so the WebUI backend and the diffusers
backend can be compared on the very same weights.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from models import CTX, ToyEncoder, tiny_sd1, tiny_sdxl
from spm_helpers import hook_counts

from lib_spm import SPMRuntimeError, SPMValueError, load_spm
from lib_spm.hosts.diffusers import DiffusersBackend
from lib_spm.hosts.webui.model import model_kind
from lib_spm.hosts.webui.trainer import WebUIBackend
from lib_spm.training.train_config import TrainConfig
from lib_spm.training.trainer import Conditioning, train_spm

ACP = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
ENC = ToyEncoder()


class LdmCalling(UNet2DConditionModel):
    """A diffusers UNet called as the WebUI calls its UNetModel; returns a tensor, not an output object."""

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        added = None if y is None else {"text_embeds": y[:, :CTX], "time_ids": y[:, CTX:]}
        return super().forward(x, timesteps, context, added_cond_kwargs=added).sample


def ldm_calling(unet: UNet2DConditionModel) -> LdmCalling:
    out = LdmCalling.from_config(unet.config)
    out.load_state_dict(unet.state_dict())
    return out.eval()


class FakeSDModel:
    """``shared.sd_model`` as far as training reads it (see lib_spm/hosts/webui/trainer.py)."""

    def __init__(self, unet, *, sdxl: bool = False, v: bool = False):
        self.model = SimpleNamespace(diffusion_model=unet)
        self.alphas_cumprod = ACP.clone()
        self.parameterization = "v" if v else "eps"
        self.is_sdxl, self.is_sd2, self.is_sd1 = sdxl, False, not sdxl
        self.cond_stage_key = "txt"
        self.sizes = []  # (width, height) each conditioning call was made for

    def vector(self, texts, width, height):
        pooled = ENC.encode(list(texts)).mean(1)
        size = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32) / 1024
        return torch.cat([pooled, size.repeat(len(texts), 1)], dim=1)

    def get_learned_conditioning(self, texts):
        width, height = getattr(texts, "width", 1024), getattr(texts, "height", 1024)
        self.sizes.append((width, height))
        ctx = ENC.encode(list(texts)) * 4
        if self.is_sdxl:
            return {"crossattn": ctx, "vector": self.vector(texts, width, height)}
        return ctx

    def decode_first_stage(self, z):
        return torch.tanh(z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2))


def diffusers_twin(unet, sd: FakeSDModel, prediction_type="epsilon"):
    """The diffusers backend on the same weights and the same conditioning."""

    def encode(ps):
        ctx = ENC.encode(ps) * 4
        if not sd.is_sdxl:
            return Conditioning(ctx)
        vec = sd.vector(ps, 64, 64)
        return Conditioning(ctx, {"text_embeds": vec[:, :CTX], "time_ids": vec[:, CTX:]})

    return DiffusersBackend(unet, encode, ACP, (4, 8, 8), prediction_type=prediction_type)


CASES = [("sd1", False), ("sd1-v", True), ("sdxl", False), ("sdxl-v", True)]


@pytest.mark.parametrize("name,v", CASES)
def test_predictions_equal_the_diffusers_backend(name, v):
    sdxl = name.startswith("sdxl")
    base = tiny_sdxl() if sdxl else tiny_sd1(True)
    sd = FakeSDModel(ldm_calling(base), sdxl=sdxl, v=v)
    ours = WebUIBackend(sd, resolution=64)
    twin = diffusers_twin(base, sd, "v_prediction" if v else "epsilon")
    assert ours.arch == ("sdxl" if sdxl else "sd1") and ours.latent_shape == (4, 8, 8)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10, 500, 990])
    prompts = ["a circle", "", "red square"]
    with torch.no_grad():
        a = ours.predict_eps(x, t, ours.encode(prompts))
        b = twin.predict_eps(x, t, twin.encode(prompts))
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert sd.sizes and set(sd.sizes) == {(64, 64)}  # SDXL's size conditioning sees the training resolution


def test_sdxl_vector_reaches_the_unet():
    sd = FakeSDModel(ldm_calling(tiny_sdxl()), sdxl=True)
    be = WebUIBackend(sd, resolution=96)
    seen = {}
    h = sd.model.diffusion_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        cond = be.encode(["circle", "square"])
        with torch.no_grad():
            be.predict_eps(torch.randn(2, *be.latent_shape), torch.tensor([3, 400]), cond)
    finally:
        h.remove()
    assert set(cond.added) == {"vector"}
    assert torch.equal(seen["y"], sd.vector(["circle", "square"], 96, 96))
    assert torch.equal(seen["context"], ENC.encode(["circle", "square"]) * 4)


def test_two_steps_of_training_leave_the_model_as_it_was(tmp_path):
    sd = FakeSDModel(ldm_calling(tiny_sdxl()), sdxl=True, v=True)
    unet = sd.model.diffusion_model
    for i, p in enumerate(unet.parameters()):  # a mix, as a host might leave it
        p.requires_grad_(i % 2 == 0)
    grads = [p.requires_grad for p in unet.parameters()]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    hooks = hook_counts(unet)
    be = WebUIBackend(sd, resolution=64)
    cfg = TrainConfig(targets=["circle"], surrogates={"circle": "square"}, iterations=2, lr=1e-2, warmup=1,
                      max_denoising_steps=3, anchors=1, la_strength=10.0, arch=be.arch, name="no_circle")
    res = train_spm(be, cfg, tmp_path / "x.safetensors")
    spm = load_spm(res.spm_path)
    assert res.steps == 2 and spm.parameter_count > 0 and spm.metadata.arch == "sdxl"
    assert any(lw.up.abs().sum() > 0 for lw in spm.layers.values())  # it learned something
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert [p.requires_grad for p in unet.parameters()] == grads
    assert hook_counts(unet) == hooks


def test_a_half_precision_unet_gives_fp32_predictions_and_trains(tmp_path):
    """The WebUI keeps its UNet in half precision; the adapter and the losses stay fp32 (bf16 on CPU here)."""
    unet = torch.nn.Module.to(ldm_calling(tiny_sd1(True)), torch.bfloat16)  # plain Module.to: no diffusers warning
    be = WebUIBackend(FakeSDModel(unet), resolution=64)
    assert be.dtype == torch.bfloat16
    with torch.no_grad():
        eps = be.predict_eps(torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), be.encode(["circle", ""]))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
    cfg = TrainConfig(targets=["circle"], iterations=2, lr=1e-2, warmup=1, max_denoising_steps=3, anchors=1,
                      la_strength=10.0)
    res = train_spm(be, cfg, tmp_path / "half.safetensors")
    spm = load_spm(res.spm_path)
    assert all(np.isfinite(h.loss) for h in res.history)
    assert all(lw.up.dtype == torch.float32 for lw in spm.layers.values())
    assert max(float(lw.up.abs().max()) for lw in spm.layers.values()) > 0  # gradients reached the fp32 factors
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())


def test_decode_maps_the_vae_range_to_unit_interval():
    sd = FakeSDModel(ldm_calling(tiny_sd1()))
    be = WebUIBackend(sd, resolution=64)
    z = torch.randn(2, 4, 8, 8) * 3
    img = be.decode(z)
    assert img.shape == (2, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
    assert torch.allclose(img, (sd.decode_first_stage(z) + 1) / 2)


@pytest.mark.parametrize("change,match", [
    (dict(is_sd3=True), "SD3"),
    (dict(is_ssd=True), "SSD-1B"),
    (dict(cond_stage_key="edit"), "InstructPix2Pix"),
    (dict(is_sd1=False), "unknown model type"),
    (dict(lowvram=True), "medvram"),
    (dict(parameterization="x0"), "parameterization"),
])
def test_unknown_or_unsupported_models_are_refused(change, match):
    sd = FakeSDModel(ldm_calling(tiny_sd1()))
    for k, v in change.items():
        setattr(sd, k, v)
    with pytest.raises(SPMRuntimeError, match=match):
        WebUIBackend(sd, resolution=64)


def test_inpainting_unets_and_odd_resolutions_are_refused():
    torch.manual_seed(0)
    inpaint = LdmCalling(sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                         norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CTX,
                         attention_head_dim=2)
    with pytest.raises(SPMRuntimeError, match="9 input channels"):
        model_kind(FakeSDModel(inpaint))
    with pytest.raises(SPMValueError, match="multiple of 8"):
        WebUIBackend(FakeSDModel(ldm_calling(tiny_sd1())), resolution=500)
    with pytest.raises(SPMRuntimeError, match="diffusion_model"):
        model_kind(SimpleNamespace(is_sd1=True))
