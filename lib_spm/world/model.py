"""The shapes world's models: a tiny SD-style text-to-image model and a classifier to judge it.

- Text: Stable Diffusion's real CLIP BPE tokenizer (ids as SD sees them), feeding a tiny
  ``CLIPTextModel`` whose embedding table holds only the world's tokens (ids are remapped; any
  other token becomes "unknown"), so it costs 0.1 M parameters instead of 3 M.
- Latents: the 32x32 RGB image folded 2x2 into a 12x16x16 tensor (pixel unshuffle), an exact and
  free stand-in for SD's VAE.
- UNet: a diffusers ``UNet2DConditionModel`` with cross-attention ``Transformer2DModel`` blocks,
  like SD's, so SPMs see the same kinds of layers.
- Classifier: a small CNN with a shape head and a colour head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tools.clip_vocab import clip_tokenizer
from . import data

WEIGHTS = Path(__file__).parent / "weights"
TEXT_WIDTH = 64
LATENT = (12, 16, 16)

UNET_CONFIG = dict(
    sample_size=16, in_channels=12, out_channels=12, layers_per_block=1,
    block_out_channels=(64, 128, 128), norm_num_groups=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=4,  # diffusers reads this as the number of heads
)
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def encode_image(img: torch.Tensor) -> torch.Tensor:
    """[B, 32, 32, 3] in [0, 1] (or [B, 3, 32, 32]) -> latents [B, 12, 16, 16] in [-1, 1]."""
    if img.shape[-1] == 3:
        img = img.permute(0, 3, 1, 2)
    return F.pixel_unshuffle(img * 2 - 1, 2)


def decode_latent(lat: torch.Tensor) -> torch.Tensor:
    """Latents -> [B, 3, 32, 32] in [0, 1]."""
    return (F.pixel_shuffle(lat, 2) + 1).div(2).clamp(0, 1)


class WorldTextEncoder(nn.Module):
    """CLIP tokens -> [B, 77, 64], SD1-style (last hidden state), through a compact vocabulary."""

    def __init__(self, tokenizer=None):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.tokenizer = tokenizer or clip_tokenizer()
        ids = sorted({i for w in data.vocabulary() for i in self.tokenizer(w, add_special_tokens=False).input_ids})
        specials = [self.tokenizer.bos_token_id, self.tokenizer.eos_token_id]
        table = torch.zeros(len(self.tokenizer), dtype=torch.long)  # 0 = unknown token
        for compact, sd_id in enumerate(specials + ids, start=1):
            table[sd_id] = compact
        self.register_buffer("id_map", table, persistent=False)
        n = len(specials) + len(ids) + 1
        self.model = CLIPTextModel(CLIPTextConfig(
            vocab_size=n, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, eos_token_id=int(table[self.tokenizer.eos_token_id]),
            bos_token_id=int(table[self.tokenizer.bos_token_id]), pad_token_id=int(table[self.tokenizer.eos_token_id]),
        ))

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(self.id_map[input_ids.to(self.id_map.device)]).last_hidden_state

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self(self.token_ids(prompts))

    def tokens(self, prompts: list[str]) -> list[tuple[int, ...]]:
        special = set(self.tokenizer.all_special_ids)
        return [tuple(i for i in row if i not in special) for row in self.tokenizer(prompts).input_ids]


class Classifier(nn.Module):
    """32x32 RGB -> (shape logits, colour logits)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.shape = nn.Linear(256, len(data.SHAPES))
        self.colour = nn.Linear(256, len(data.COLOURS))

    def forward(self, img: torch.Tensor):
        h = self.body(img)
        return self.shape(h), self.colour(h)


def new_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def new_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@dataclass
class World:
    unet: nn.Module
    text_encoder: WorldTextEncoder
    classifier: Classifier
    info: dict

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer


def load_world(folder: str | Path = WEIGHTS) -> World:
    """The shipped, trained world (weights in ``lib_spm/world/weights``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    unet, te, clf = new_unet(), WorldTextEncoder(), Classifier()
    unet.load_state_dict(load_file(folder / "unet.safetensors"))
    te.model.load_state_dict(load_file(folder / "text_encoder.safetensors"))
    clf.load_state_dict(load_file(folder / "classifier.safetensors"))
    info = json.loads((folder / "world.json").read_text())
    for m in (unet, te, clf):
        m.eval().requires_grad_(False)
    return World(unet, te, clf, info)
