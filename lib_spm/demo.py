"""``python -m lib_spm demo``: a real diffusers pipeline, an SPM file in the original zoo format,
applied with per-row Facilitated Transport, and a report of what it changed.

Until the shapes world ships (a trained model in which erasure can be counted), the pipeline is a
tiny seeded one with random weights: the report measures the mechanics (which rows the gate
opens, how much each prompt's image moves, that detaching restores the model exactly), not
erasure quality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

TEXT_WIDTH = 32


def tiny_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_vocab import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4,
    )
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompts, seed=1):
    out = pipe(prompt=prompts, negative_prompt=[""] * len(prompts), num_inference_steps=6, guidance_scale=5.0,
               height=16, width=16, output_type="np", generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images)


def run_demo(out_dir: str | Path, concept: str = "circle") -> dict:
    from .hosts.diffusers import SPMPipeline
    from .session import GateSettings
    from .spm_file import load_spm
    from .zoo import write_zoo_file

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = tiny_pipeline()
    spm_path = out / f"erase_{concept.replace(' ', '_')}.safetensors"
    spm_path.unlink(missing_ok=True)
    write_zoo_file(spm_path, pipe.unet, [concept], rank=1, std=0.5, seed=3)
    spm = load_spm(spm_path)

    targets = [f"a red {concept}", concept]
    others = ["a blue square", "a green triangle on grass"]
    prompts = targets + others
    base = _generate(pipe, prompts)
    report = {}
    for label, gate in (("ft_on", GateSettings()), ("ft_off", GateSettings(enabled=False))):
        with SPMPipeline(pipe, [(spm, 1.0)], gate=gate) as run:
            images = _generate(run, prompts)
            gates = run.session.last_gates[:, 0].tolist()  # rows: uncond..., cond...
        change = np.abs(np.asarray(images) - base).mean(axis=(1, 2, 3))
        report[label] = {
            "gate_per_prompt": dict(zip(prompts, [round(g, 4) for g in gates[len(prompts):]])),
            "gate_negative_prompt": round(gates[0], 4),
            "mean_abs_change_per_prompt": dict(zip(prompts, [round(float(c), 5) for c in change])),
        }
        if label == "ft_on":
            _save_grid(out / "grid.png", base, np.asarray(images))
    detached_exact = bool(np.array_equal(_generate(pipe, prompts), base))
    on, off = report["ft_on"]["mean_abs_change_per_prompt"], report["ft_off"]["mean_abs_change_per_prompt"]
    metrics = {
        "concept": concept,
        "spm_file": str(spm_path),
        "model": "tiny seeded SD-style pipeline, random weights (shapes world pending)",
        "prompts": {"target": targets, "other": others},
        **report,
        "other_prompt_change_ratio_ft_on_vs_off": round(
            sum(on[p] for p in others) / max(sum(off[p] for p in others), 1e-12), 4),
        "detach_restores_bit_exact_output": detached_exact,
        "seconds": round(time.time() - t0, 2),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _save_grid(path: Path, before: np.ndarray, after: np.ndarray) -> None:
    from PIL import Image

    rows = [np.concatenate(list(imgs), axis=1) for imgs in (before, after)]
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 8, grid.shape[0] * 8), Image.NEAREST).save(path)
