"""Train the shapes world from scratch: ``python -m lib_spm world train --out DIR --steps N``.

Text encoder and UNet are trained together on freshly rendered batches, epsilon prediction on
SD's noise schedule with min-SNR-5 loss weighting, 10% empty captions for classifier-free
guidance, and an exponential moving average of the weights (the EMA is what ships). Checkpoints
every ``--save-every`` steps; ``--resume`` continues a run bit-for-bit from its last checkpoint.
The classifier that judges the world trains separately (``train_classifier``) on clean renders.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..progress import Progress
from . import data
from .model import Classifier, WorldTextEncoder, encode_image, new_scheduler, new_unet



def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def export(folder: Path, unet, text_encoder, extra: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(folder / "unet.safetensors"))
    save_file({k: v.contiguous() for k, v in text_encoder.model.state_dict().items()},
              str(folder / "text_encoder.safetensors"))
    info = json.loads((folder / "world.json").read_text()) if (folder / "world.json").exists() else {}
    info.update(extra)
    (folder / "world.json").write_text(json.dumps(info, indent=2))


def diffusion_loss(unet, te, imgs, items, acp, loss_w) -> torch.Tensor:
    """Min-SNR-weighted epsilon loss on one rendered batch (text encoder trained jointly)."""
    x0 = encode_image(torch.from_numpy(imgs))
    ctx = te(te.token_ids([it.caption for it in items]))
    noise = torch.randn_like(x0)
    t = torch.randint(0, acp.shape[0], (x0.shape[0],))
    a = acp[t].view(-1, 1, 1, 1)
    pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, ctx).sample
    return (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * loss_w[t]).mean()


def finetune(world, steps: int, *, style: str = "stripes", lr: float = 2e-4, batch: int = 32, seed: int = 5):
    """A copy of the world fine-tuned briefly on another style (for model-transfer tests)."""
    from .model import World

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    unet, te = copy.deepcopy(world.unet), copy.deepcopy(world.text_encoder)
    unet.train().requires_grad_(True)
    te.train().requires_grad_(True)
    params = list(unet.parameters()) + list(te.model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    acp = new_scheduler().alphas_cumprod.float()
    snr = acp / (1 - acp)
    loss_w = torch.clamp(snr, max=5.0) / snr
    for _ in range(steps):
        loss = diffusion_loss(unet, te, *data.batch(rng, batch, style=style), acp, loss_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for m in (unet, te):
        m.eval().requires_grad_(False)
    return World(unet, te, world.classifier, {**world.info, "finetuned": {"style": style, "steps": steps, "lr": lr}})


def train_world(out: str | Path, steps: int, *, batch: int = 64, lr: float = 6e-4, warmup: int = 300,
                ema_decay: float = 0.999, save_every: int = 250, seed: int = 0, resume: bool = False,
                threads: int | None = None, log=print) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    unet, te = new_unet(), WorldTextEncoder()
    params = list(unet.parameters()) + list(te.model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    acp = new_scheduler().alphas_cumprod.float()
    snr = acp / (1 - acp)
    loss_w = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction
    step, rng = 0, np.random.default_rng(seed)
    ema_unet, ema_te = copy.deepcopy(unet), copy.deepcopy(te)
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)  # our own training state, never a user file
        unet.load_state_dict(state["unet"]), te.model.load_state_dict(state["te"])
        ema_unet.load_state_dict(state["ema_unet"]), ema_te.model.load_state_dict(state["ema_te"])
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
        torch.set_rng_state(state["torch_rng"])
        log(f"resumed at step {step}")
    ema_unet.requires_grad_(False), ema_te.requires_grad_(False)
    t0, losses = time.time(), []
    bar = Progress("world train", steps - step)
    while step < steps:
        loss = diffusion_loss(unet, te, *data.batch(rng, batch), acp, loss_w)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        _ema_update(ema_unet, unet, ema_decay if step > warmup else 0.0)
        _ema_update(ema_te.model, te.model, ema_decay if step > warmup else 0.0)
        losses.append(loss.item())
        bar.advance(note=f"step {step} loss {loss.item():.4f}")
        if step % 50 == 0:
            log(f"step {step} loss {np.mean(losses[-50:]):.4f} {(time.time() - t0) / len(losses):.2f}s/step")
        if step % save_every == 0 or step == steps:
            torch.save({"unet": unet.state_dict(), "te": te.model.state_dict(), "ema_unet": ema_unet.state_dict(),
                        "ema_te": ema_te.model.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng,
                        "torch_rng": torch.get_rng_state()}, out / "checkpoint.tmp")
            (out / "checkpoint.tmp").replace(ckpt)
            export(out / "ema", ema_unet, ema_te, {"steps": step, "batch": batch, "lr": lr, "seed": seed,
                                                   "ema_decay": ema_decay})
    return out / "ema"


def train_classifier(folder: str | Path, *, steps: int = 3000, batch: int = 128, seed: int = 1, log=print) -> float:
    """Train the judge on clean renders of every style; returns its worst accuracy (shape or
    colour, any style) on 2,000 fresh renders per style, and saves it to ``folder``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    clf = Classifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        imgs, items = data.batch(rng, batch, style=data.STYLES[step % len(data.STYLES)])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
        x = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)  # generated images are never quite clean
        s, c = clf(x)
        loss = F.cross_entropy(s, torch.tensor([it.shape for it in items])) + F.cross_entropy(
            c, torch.tensor([it.colour for it in items]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log(f"classifier step {step + 1} loss {loss.item():.4f}")
    clf.eval()
    worst = 1.0
    for style in data.STYLES:
        imgs, items = data.batch(np.random.default_rng(seed + 1000), 2000, style=style)
        with torch.no_grad():
            s, c = clf(torch.from_numpy(imgs).permute(0, 3, 1, 2))
        acc_s = (s.argmax(1) == torch.tensor([it.shape for it in items])).float().mean().item()
        acc_c = (c.argmax(1) == torch.tensor([it.colour for it in items])).float().mean().item()
        log(f"classifier clean accuracy ({style}): shape {acc_s:.4f} colour {acc_c:.4f}")
        worst = min(worst, acc_s, acc_c)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(clf.state_dict(), str(folder / "classifier.safetensors"))
    return worst


def release(run_folder: str | Path, classifier: str | Path, dst: str | Path) -> Path:
    """Copy a run's EMA weights (fp16: half the size, no measurable change) and a classifier into
    the folder that ships with the package."""
    from safetensors.torch import load_file

    run_folder, dst = Path(run_folder), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("unet.safetensors", "text_encoder.safetensors"):
        sd = load_file(str(run_folder / name))
        save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in sd.items()}, str(dst / name))
    save_file(load_file(str(classifier)), str(dst / "classifier.safetensors"))
    info = json.loads((run_folder / "world.json").read_text())
    (dst / "world.json").write_text(json.dumps(info, indent=2))
    return dst
