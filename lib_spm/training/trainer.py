"""Data-free SPM training (SPM_METHOD.md), host-agnostic behind a small backend protocol.

Per iteration: pick a target concept, denoise random latents to a random step with the adapter
on, then fit the adapter's prediction on the target to ``eps(c_n) - g * (eps(c_t) - eps(c_n))``
(erase towards the surrogate ``c_n``) while Latent Anchoring keeps it equal to the frozen model
on random anchor embeddings. Frozen predictions come from the same UNet with the adapter off.

All randomness flows from one seeded ``torch.Generator``; a checkpoint stores its state with the
adapter and optimizer (safetensors, no pickle), so a resumed run ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..errors import SPMValueError
from ..format.metadata import SPMMetadata
from ..format.safetensors_io import read_file, write_file
from .adapter import TrainableAdapter
from .schedule import ddim_step, leading_timesteps
from .train_config import (
    TrainConfig,
    checkpoint_info,
    checkpoint_metadata,
    checkpoint_path,
    resume_differences,
)

# UNets this large (full-size SD: 0.86-2.6 B parameters) train with gradient checkpointing: it
# cut the peak memory of `bench train-memory` (BENCHMARKS.md); tiny models stay fast without it.
CHECKPOINTING_FROM_PARAMETERS = 100_000_000
# "pool" sampling: trajectories per pool (2 x 19 tuples at the shapes world's 20 steps)
POOL_TRAJECTORIES = 2  # small: the pool follows the adapter (a stale pool trains off-policy)


@dataclass
class Conditioning:
    """What one prompt gives the UNet: the cross-attention context, plus SDXL's added inputs."""

    context: torch.Tensor  # [n, L, D]
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds [n, P], time_ids [n, 6]

    def __len__(self):
        return self.context.shape[0]

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        added = None
        if parts[0].added is not None:
            added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return Conditioning(torch.cat([p.context for p in parts]), added)

    def repeat(self, n: int) -> "Conditioning":
        return Conditioning.cat([self] * n)


class Backend(Protocol):
    """What the trainer needs from a host. Diffusers models (:class:`lib_spm.hosts.diffusers.DiffusersBackend`,
    also the shapes world's) and the WebUI (:class:`lib_spm.hosts.webui.trainer.WebUIBackend`) fit it."""

    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor  # [T], on any device
    latent_shape: tuple[int, int, int]  # (C, H, W) of the latents to train at

    def encode(self, prompts: list[str]) -> Conditioning: ...

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Noise prediction at (x_t, t); v-prediction models convert v to epsilon here."""


@dataclass
class TrainStatus:
    step: int
    total: int
    loss: float
    erase_loss: float
    anchor_loss: float
    lr: float
    seconds: float
    eta_seconds: float
    passes: int  # UNet sample-passes this iteration (a pool refill counts in the iteration that makes it)


@dataclass
class TrainResult:
    spm_path: Path
    steps: int
    cancelled: bool
    history: list[TrainStatus]
    seconds: float
    checkpoint_path: Path | None


def _lr_at(cfg: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.iterations))


class Trainer:
    """One SPM's training state: adapter, optimizer, random generator and, for ``sampling="pool"``,
    the trajectory pool.

    Sampling of x_t:

    - ``fresh``: every iteration denoises new noise with CFG and the adapter on to a uniform step
      in [1, S-1], then runs the frozen model on x_t: ``2*B*idx + (2+k)*B`` frozen passes.
    - ``pool``: full S-step CFG DDIM trajectories of the target prompts from noise, sampled as
      the SPM will be used (target rows through the current adapter, unconditional rows frozen),
      keep every step's (x_i, t_i, frozen eps_uncond); iterations draw tuples with i in [1, S-1]
      without replacement, refilling when empty. eps_n when the surrogate is "" (then c_n is the
      unconditional prompt) comes free, so the frozen pass covers the target and the anchors
      only. A trajectory costs 2*S passes for S-1 tuples. Pools stay small
      (:data:`POOL_TRAJECTORIES`): trajectories of the frozen model alone trained off-policy and
      erased far less (BENCHMARKS.md). A pool depends on the adapter when it was made, so the
      checkpoint stores the pool itself; resume continues from it and ends bit-identical.
    """

    def __init__(self, backend: Backend, cfg: TrainConfig, *, autocast: bool = True):
        self.backend, self.cfg = backend, cfg
        self.device = next(backend.unet.parameters()).device
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.adapter = TrainableAdapter(backend.unet, rank=cfg.rank, alpha=cfg.alpha, generator=self.gen)
        self.opt = torch.optim.AdamW(self.adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        acp = backend.alphas_cumprod.float()
        self.timesteps = leading_timesteps(cfg.max_denoising_steps, acp.shape[0])
        self.acp = acp.to(self.device)
        self._prompts = [(c, tpl) for c in cfg.targets for tpl in cfg.templates]
        self._cond_cache: dict[str, Conditioning] = {}
        # autocast on CUDA: bf16 where the GPU has it, else fp16 with a loss scaler (the adapter's
        # parameters and its optimizer stay fp32 either way)
        self.amp_dtype = None
        if autocast and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.pool: dict[str, torch.Tensor] | None = None  # "pool" sampling: the current pool's tensors
        self.pool_state = {"refills": 0, "pos": 0, "trajectories": 0}  # pools made, tuples drawn from the last

    def _amp(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    # -- pieces ---------------------------------------------------------------------------------
    def _cond(self, prompt: str) -> Conditioning:
        if prompt not in self._cond_cache:
            with torch.no_grad():
                c = self.backend.encode([prompt])
            self._cond_cache[prompt] = Conditioning(c.context.detach(), c.added and {k: v.detach() for k, v in c.added.items()})
        return self._cond_cache[prompt]

    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.device)

    def _anchors(self, target: torch.Tensor, k: int) -> torch.Tensor:
        """k embeddings: random directions, kept with probability 1 - cos(., target), at |target| x U(.8, 1.2)."""
        flat = target.flatten().float().cpu()
        norm = flat.norm()
        out = []
        for _ in range(100 * k):
            if len(out) == k:
                break
            d = torch.randn(flat.shape, generator=self.gen)
            cos = F.cosine_similarity(d, flat, dim=0).clamp(-1, 1)
            if torch.rand((), generator=self.gen) < 1 - cos:
                scale = norm * (0.8 + 0.4 * torch.rand((), generator=self.gen))
                out.append(d / d.norm() * scale)
        return torch.stack(out).view(k, *target.shape[1:]).to(target.device, target.dtype)

    def _ddim_to(self, x: torch.Tensor, idx: int, cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
        both = Conditioning.cat([uncond.repeat(len(x)), cond.repeat(len(x))])
        for i in range(idx):
            t, t_prev = self.timesteps[i], self.timesteps[i + 1]
            eps_u, eps_c = self.backend.predict_eps(torch.cat([x, x]), t.repeat(2 * len(x)).to(self.device), both).chunk(2)
            eps = eps_u + self.cfg.denoise_cfg * (eps_c - eps_u)
            x = ddim_step(x, eps, self.acp[t], self.acp[t_prev])
        return x

    # -- the trajectory pool ("pool" sampling) -----------------------------------------------------
    def _pool_generator(self, r: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + r) % (2**63))

    def _pool_chunk(self) -> int:
        """Trajectories per UNet call: their CFG batch stays within the fresh sampler's frozen batch."""
        k = self.cfg.anchors if self.cfg.la_strength > 0 else 0
        return max(1, (2 + k) * self.cfg.batch // 2)

    def _build_pool(self, r: int, trajectories: int) -> int:
        """Make pool number ``r`` (deterministic in (seed, r, trajectories)); returns its UNet passes."""
        cfg, n = self.cfg, self.cfg.max_denoising_steps
        g = self._pool_generator(r)
        prompts = torch.randint(len(self._prompts), (trajectories,), generator=g)
        x = torch.randn(trajectories, *self.backend.latent_shape, generator=g).to(self.device)
        uncond = self._cond("")
        xs, eus = [], []
        for s in range(0, trajectories, self._pool_chunk()):
            conds = [self._cond(self._prompts[int(p)][1].format(self._prompts[int(p)][0])) for p in prompts[s : s + self._pool_chunk()]]
            with torch.no_grad(), self._amp():
                xc, eu = self._trajectory(x[s : s + len(conds)], Conditioning.cat(conds), uncond)
            xs.append(xc), eus.append(eu)
        self.pool = {"x": torch.cat(xs), "eps_u": torch.cat(eus), "prompt": prompts,
                     "order": torch.randperm(trajectories * (n - 1), generator=g)}
        self.pool_state = {"refills": r + 1, "pos": 0, "trajectories": trajectories}
        return 2 * trajectories * n

    def _trajectory(self, x: torch.Tensor, cond: Conditioning, uncond: Conditioning):
        """Full CFG DDIM trajectories as the SPM samples at use: the target rows through the current
        adapter, the unconditional rows frozen (a calibrated gate gives "" gate 0). Returns x_i and
        frozen eps_uncond(x_i) for i in [0, S-1], each [b, S, ...] (what iterations reuse)."""
        uncond = uncond.repeat(len(x))
        xs, eus = [], []
        n = self.cfg.max_denoising_steps
        for i in range(n):
            t = self.timesteps[i].repeat(len(x)).to(self.device)
            with self.adapter.disabled():
                eps_u = self.backend.predict_eps(x, t, uncond).float()
            eps_c = self.backend.predict_eps(x, t, cond).float()
            t = self.timesteps[i]
            xs.append(x), eus.append(eps_u)
            if i + 1 < n:
                eps = eps_u + self.cfg.denoise_cfg * (eps_c - eps_u)
                x = ddim_step(x, eps, self.acp[t], self.acp[self.timesteps[i + 1]]).float()
        return torch.stack(xs, 1), torch.stack(eus, 1)

    def _pool_draw(self) -> tuple[int, int, int, int]:
        """One tuple: (trajectory, step index in [1, S-1], prompt index, passes spent refilling)."""
        n, spent = self.cfg.max_denoising_steps, 0
        if self.pool is None or self.pool_state["pos"] >= len(self.pool["order"]):
            left = (self.cfg.iterations - self.step) * self.cfg.batch  # no bigger than the run still needs
            spent += self._build_pool(self.pool_state["refills"], max(1, min(POOL_TRAJECTORIES, -(-left // (n - 1)))))
        j = int(self.pool["order"][self.pool_state["pos"]])
        self.pool_state["pos"] += 1
        traj, i = divmod(j, n - 1)
        return traj, i + 1, int(self.pool["prompt"][traj]), spent

    def pool_tuples(self, count: int):
        """Draw ``count`` pool tuples: x [count, ...], timesteps, frozen eps_uncond, prompt indices,
        passes spent refilling."""
        drawn = [self._pool_draw() for _ in range(count)]
        tr = torch.tensor([d[0] for d in drawn])
        ix = torch.tensor([d[1] for d in drawn])
        p = self.pool
        return (p["x"][tr, ix], self.timesteps[ix].to(self.device), p["eps_u"][tr, ix], [d[2] for d in drawn],
                sum(d[3] for d in drawn))

    # -- one iteration --------------------------------------------------------------------------
    def iteration(self) -> TrainStatus:
        if self.cfg.sampling == "pool":
            return self._pool_iteration()
        cfg, t0 = self.cfg, time.time()
        pick = int(torch.randint(len(self._prompts), (), generator=self.gen))
        concept, template = self._prompts[pick]
        c_t = self._cond(template.format(concept))
        c_n = self._cond(template.format(cfg.surrogates[concept]) if cfg.surrogates.get(concept) else "")
        uncond = self._cond("")
        idx = int(torch.randint(1, cfg.max_denoising_steps, (), generator=self.gen))
        B = cfg.batch
        x = self._randn(B, *self.backend.latent_shape)
        with torch.no_grad(), self._amp():
            x = self._ddim_to(x, idx, c_t, uncond).float()
        t = self.timesteps[idx].repeat(B).to(self.device)
        k = cfg.anchors if cfg.la_strength > 0 else 0
        anchors = [Conditioning(self._anchors(c_t.context, 1), c_n.added) for _ in range(k)]
        frozen_conds = Conditioning.cat([c_t.repeat(B), c_n.repeat(B)] + [a.repeat(B) for a in anchors])
        with torch.no_grad(), self.adapter.disabled(), self._amp():  # frozen: nothing kept for backward
            frozen = self.backend.predict_eps(x.repeat(2 + k, 1, 1, 1), t.repeat(2 + k), frozen_conds).float()
        eps_t, eps_n, eps_a = frozen[:B], frozen[B : 2 * B], frozen[2 * B :]
        passes = 2 * B * idx + (2 + k) * B + (1 + k) * B
        return self._step(x, t, c_t.repeat(B), anchors, eps_t, eps_n, eps_a, passes, t0)

    def _pool_iteration(self) -> TrainStatus:
        cfg, t0, B = self.cfg, time.time(), self.cfg.batch
        x, t, eps_u, picks, spent = self.pool_tuples(B)
        c_t = Conditioning.cat([self._cond(self._prompts[p][1].format(self._prompts[p][0])) for p in picks])
        surrogates = [self._surrogate_prompt(p) for p in picks]
        k = cfg.anchors if cfg.la_strength > 0 else 0
        added = self._cond(surrogates[0]).added  # SDXL: the surrogate's added inputs, as in "fresh"
        anchors = [Conditioning(self._anchors(c_t.context[:1], 1), added) for _ in range(k)]
        named = [i for i, s in enumerate(surrogates) if s]  # rows whose surrogate is not "": eps_n needs a pass
        frozen_conds = [c_t] + [self._cond(surrogates[i]) for i in named] + [a.repeat(B) for a in anchors]
        xs, ts = torch.cat([x, x[named]] + [x] * k), torch.cat([t, t[named]] + [t] * k)
        with torch.no_grad(), self.adapter.disabled(), self._amp():
            frozen = self.backend.predict_eps(xs, ts, Conditioning.cat(frozen_conds)).float()
        eps_t, eps_n = frozen[:B], eps_u.clone()
        eps_n[named] = frozen[B : B + len(named)]
        eps_a = frozen[B + len(named) :]
        passes = spent + B + len(named) + k * B + (1 + k) * B
        return self._step(x, t, c_t, anchors, eps_t, eps_n, eps_a, passes, t0)

    def _surrogate_prompt(self, pick: int) -> str:
        concept, template = self._prompts[pick]
        sur = self.cfg.surrogates.get(concept)
        return template.format(sur) if sur else ""

    def _step(self, x, t, c_t: Conditioning, anchors: list[Conditioning], eps_t, eps_n, eps_a, passes: int,
              t0: float) -> TrainStatus:
        """The adapter's pass on the target and the anchors, the loss, and the optimizer step."""
        cfg, B, k = self.cfg, len(x), len(anchors)
        live_conds = Conditioning.cat([c_t] + [a.repeat(B) for a in anchors])
        with self._amp():
            live = self.backend.predict_eps(x.repeat(1 + k, 1, 1, 1), t.repeat(1 + k), live_conds)
        live = live.float()
        erase = F.mse_loss(live[:B], eps_n - cfg.guidance * (eps_t - eps_n))
        anchor = F.mse_loss(live[B:], eps_a) if k else torch.zeros((), device=self.device)
        loss = erase + cfg.la_strength * anchor
        lr = _lr_at(cfg, self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        self.step += 1
        return TrainStatus(self.step, cfg.iterations, loss.item(), erase.item(), anchor.item(), lr,
                           time.time() - t0, 0.0, passes)

    # -- files ----------------------------------------------------------------------------------
    def metadata(self) -> SPMMetadata:
        cfg = self.cfg
        recipe = {**cfg.recipe(), "steps_done": self.step}
        return SPMMetadata(targets=list(cfg.targets), surrogates=dict(cfg.surrogates), arch=cfg.arch,
                           name=cfg.name, description=cfg.description, recipe=recipe)

    def save_spm(self, path: str | Path, overwrite: bool = True) -> Path:
        return self.adapter.to_spm(self.metadata()).save(path, overwrite=overwrite)

    def save_checkpoint(self, path: str | Path) -> Path:
        tensors = dict(self.adapter.state_tensors())
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            for name, v in st.items():
                tensors[f"opt.{i}.{name}"] = torch.as_tensor(v).float().reshape(-1) if name == "step" else v.detach().cpu()
        tensors["rng"] = self.gen.get_state().float()  # bytes as exact floats: SPM I/O admits float dtypes only
        for name, v in (self.pool or {}).items():  # made by an adapter state that is gone: kept, not rebuilt
            tensors[f"pool.{name}"] = v.detach().float().cpu()
        md = {**checkpoint_metadata(self.cfg, self.step), "pool": json.dumps(self.pool_state)}
        return write_file(path, tensors, md, overwrite=True)

    def load_checkpoint(self, path: str | Path) -> None:
        tensors, md = read_file(path)
        saved, _ = checkpoint_info(path, md)  # made before "pool" sampling existed: "fresh", the default
        diff = resume_differences(self.cfg, saved)
        if diff:
            raise SPMValueError(f"checkpoint was made with other settings: {', '.join(diff)}")
        self.adapter.load_state_tensors(tensors)
        params = list(self.adapter.parameters())
        state = {}
        for i in range(len(params)):
            if f"opt.{i}.exp_avg" in tensors:
                state[i] = {"step": tensors[f"opt.{i}.step"].reshape(()),
                            "exp_avg": tensors[f"opt.{i}.exp_avg"].to(self.device),
                            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(self.device)}
        sd = self.opt.state_dict()
        sd["state"] = state
        self.opt.load_state_dict(sd)
        self.gen.set_state(tensors["rng"].to(torch.uint8))
        self.step = int(md["step"])
        self.pool = None
        self.pool_state = {"refills": 0, "pos": 0, "trajectories": 0}
        if "pool" in md:
            st = json.loads(md["pool"])
            self.pool_state = {k: int(st[k]) for k in ("refills", "pos", "trajectories")}
        if "pool.x" in tensors:
            self.pool = {k: tensors[f"pool.{k}"].to(self.device) for k in ("x", "eps_u")}
            self.pool.update({k: tensors[f"pool.{k}"].long() for k in ("prompt", "order")})


def train_spm(
    backend: Backend,
    cfg: TrainConfig,
    out_path: str | Path,
    *,
    on_step: Callable[[TrainStatus], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_every: int = 0,
    resume_from: str | Path | None = None,
    watch: Callable[[Trainer], None] | None = None,
    gradient_checkpointing: bool | None = None,
    autocast: bool = True,
) -> TrainResult:
    """Train, calling ``on_step`` each iteration; ``should_stop`` cancels (what exists is saved).

    ``watch`` gets the trainer once its adapter is attached and after every iteration (after that
    iteration's checkpoint is written), for previews; it must not draw from ``trainer.gen``.
    The checkpoint lives next to the output as ``<name>.ckpt.safetensors``.
    ``gradient_checkpointing`` (diffusers UNets): None turns it on for UNets of at least
    :data:`CHECKPOINTING_FROM_PARAMETERS` parameters; it only acts on the adapter's pass.
    ``autocast`` runs the UNet passes under CUDA autocast (no effect elsewhere).
    """
    out_path = Path(out_path)
    ckpt = checkpoint_path(out_path)
    trainer = Trainer(backend, cfg, autocast=autocast)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    was_training = backend.unet.training
    frozen = [p for p in backend.unet.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    history, cancelled, t0 = [], False, time.time()
    if gradient_checkpointing is None:
        gradient_checkpointing = sum(p.numel() for p in backend.unet.parameters()) >= CHECKPOINTING_FROM_PARAMETERS
    was_checkpointing = _set_checkpointing(backend.unet, gradient_checkpointing)
    trainer.adapter.attach()
    try:
        if watch is not None:
            watch(trainer)
        while trainer.step < cfg.iterations:
            if should_stop is not None and should_stop():
                cancelled = True
                break
            st = trainer.iteration()
            elapsed = time.time() - t0
            done = len(history) + 1
            st.eta_seconds = elapsed / done * (cfg.iterations - trainer.step)
            history.append(st)
            if on_step is not None:
                on_step(st)
            if checkpoint_every and trainer.step % checkpoint_every == 0:
                trainer.save_checkpoint(ckpt)
            if watch is not None:
                watch(trainer)
    finally:
        trainer.adapter.detach()
        backend.unet.train(was_training)
        if was_checkpointing is not None:
            _set_checkpointing(backend.unet, was_checkpointing)
        for p in frozen:
            p.requires_grad_(True)
    saved_ckpt = trainer.save_checkpoint(ckpt) if (checkpoint_every or cancelled) else None
    path = trainer.save_spm(out_path)
    return TrainResult(path, trainer.step, cancelled, history, time.time() - t0, saved_ckpt)


def _set_checkpointing(unet: torch.nn.Module, on: bool) -> bool | None:
    """Switch a diffusers UNet's gradient checkpointing; returns its previous state (None: the
    UNet has no such switch, e.g. the WebUI's LDM UNet, and is left as it is)."""
    if not getattr(unet, "_supports_gradient_checkpointing", False):
        return None
    was = bool(unet.is_gradient_checkpointing)
    if on:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    return was
