"""The trainer's mechanics on tiny seeded models: seconds each, no network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from models import CTX, ToyEncoder, sdxl_added, tiny_sd1, tiny_sdxl
from spm_helpers import hook_counts

from lib_spm import SPMValueError, load_spm
from lib_spm.format.safetensors_io import read_file, write_file
from lib_spm.hosts.diffusers import DiffusersBackend
from lib_spm.training.schedule import ddim_step, eps_from_v, leading_timesteps
from lib_spm.training.train_config import TrainConfig, read_checkpoint
from lib_spm.training.trainer import Conditioning, Trainer, train_spm

ACP = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


class LoudEncoder(ToyEncoder):
    """Toy encodings scaled up so that text visibly steers the tiny random UNet."""

    def encode(self, texts):
        return super().encode(texts) * 4


def sd1_backend(seed=0):
    enc = LoudEncoder()
    return DiffusersBackend(tiny_sd1(True, seed=seed), lambda ps: Conditioning(enc.encode(ps)), ACP, (4, 8, 8))


def cfg(**kw):
    base = dict(targets=["circle"], iterations=6, lr=5e-3, warmup=1, max_denoising_steps=4, anchors=2,
                la_strength=10.0, seed=3, name="no_circle", arch=None)
    base.update(kw)
    return TrainConfig(**base)


def _probe(trainer: Trainer, n=4):
    """Erase error on fixed inputs: how far the adapted prediction is from the erase target."""
    g = torch.Generator().manual_seed(99)
    x = torch.randn(n, *trainer.backend.latent_shape, generator=g)
    t = torch.tensor([200, 400, 600, 800][:n])
    c_t = trainer._cond("circle").repeat(n)
    c_n = trainer._cond("").repeat(n)
    trainer.adapter.attach()
    try:
        with torch.no_grad():
            with trainer.adapter.disabled():
                eps_t = trainer.backend.predict_eps(x, t, c_t)
                eps_n = trainer.backend.predict_eps(x, t, c_n)
            live = trainer.backend.predict_eps(x, t, c_t)
    finally:
        trainer.adapter.detach()
    return F.mse_loss(live, eps_n - trainer.cfg.guidance * (eps_t - eps_n)).item()


def test_erase_error_drops_with_training():
    tr = Trainer(sd1_backend(), cfg(iterations=40, la_strength=0.0, anchors=0, lr=2e-2, max_denoising_steps=3))
    before = _probe(tr)
    tr.backend.unet.requires_grad_(False)
    tr.adapter.attach()
    for _ in range(40):
        tr.iteration()
    tr.adapter.detach()
    after = _probe(tr)
    assert before > 0
    assert after < 0.5 * before


def test_anchors_follow_the_acceptance_rule_and_norms():
    tr = Trainer(sd1_backend(), cfg())
    target = torch.tensor([[[3.0, 4.0]]])  # [1, L=1, D=2]: cosines spread over [-1, 1]
    a = torch.cat([tr._anchors(target, 50) for _ in range(40)]).view(-1, 2)
    norms = a.norm(dim=1)
    assert ((norms >= 0.8 * 5 - 1e-4) & (norms <= 1.2 * 5 + 1e-4)).all()
    cos = F.cosine_similarity(a, target.view(1, 2), dim=1)
    # kept with probability min(1, 1 - cos): for uniform angles in 2-D the kept cosines average
    # (-pi/2) / (2 pi - 2) = -0.367; without the rule they would average 0
    assert -0.43 < cos.mean().item() < -0.31
    full = tr._cond("circle").context
    assert tr._anchors(full, 3).shape == (3, *full.shape[1:])


def test_checkpoint_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight = train_spm(sd1_backend(), cfg(), tmp_path / "a.safetensors")
    stop_at = {"n": 0}

    def stop():
        stop_at["n"] += 1
        return stop_at["n"] > 3

    part = train_spm(sd1_backend(), cfg(), tmp_path / "b.safetensors", should_stop=stop)
    assert part.cancelled and part.steps == 3 and part.checkpoint_path.exists()
    assert load_spm(part.spm_path).metadata.recipe["steps_done"] == 3  # cancel saves what it has
    resumed = train_spm(sd1_backend(), cfg(), tmp_path / "b.safetensors", resume_from=part.checkpoint_path)
    assert resumed.steps == 6 and not resumed.cancelled
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_same_seed_same_file_other_seed_other_file(tmp_path):
    train_spm(sd1_backend(), cfg(iterations=3), tmp_path / "a.safetensors")
    train_spm(sd1_backend(), cfg(iterations=3), tmp_path / "b.safetensors")
    train_spm(sd1_backend(), cfg(iterations=3, seed=4), tmp_path / "c.safetensors")
    a, b, c = ((tmp_path / f"{n}.safetensors").read_bytes() for n in "abc")
    assert a == b and a != c


def test_resume_refuses_other_settings(tmp_path):
    part = train_spm(sd1_backend(), cfg(iterations=2), tmp_path / "a.safetensors", checkpoint_every=1)
    with pytest.raises(SPMValueError, match="rank"):
        train_spm(sd1_backend(), cfg(iterations=4, rank=2), tmp_path / "b.safetensors", resume_from=part.checkpoint_path)
    with pytest.raises(SPMValueError, match="not an SPM training checkpoint"):
        train_spm(sd1_backend(), cfg(), tmp_path / "c.safetensors", resume_from=part.spm_path)


def test_saved_file_carries_the_recipe_and_targets(tmp_path):
    c = cfg(targets=["circle", "red disc, large"], surrogates={"circle": "square"}, description="test", iterations=2)
    seen = []
    res = train_spm(sd1_backend(), c, tmp_path / "x.safetensors", on_step=seen.append)
    spm = load_spm(res.spm_path)
    assert spm.metadata.targets == ["circle", "red disc, large"]
    assert spm.metadata.surrogates == {"circle": "square"}
    assert spm.metadata.name == "no_circle" and spm.metadata.description == "test"
    assert spm.metadata.recipe["la_strength"] == 10.0 and spm.metadata.recipe["steps_done"] == 2
    assert [s.step for s in seen] == [1, 2] and all(s.passes > 0 for s in seen)
    assert seen[-1].eta_seconds == 0.0 and seen[0].eta_seconds > 0


def test_training_never_touches_the_model(tmp_path):
    be = sd1_backend()
    before = {k: v.clone() for k, v in be.unet.state_dict().items()}
    grads = [p.requires_grad for p in be.unet.parameters()]
    hooks = hook_counts(be.unet)
    train_spm(be, cfg(iterations=3), tmp_path / "x.safetensors")
    assert all(torch.equal(before[k], v) for k, v in be.unet.state_dict().items())
    assert [p.requires_grad for p in be.unet.parameters()] == grads
    assert hook_counts(be.unet) == hooks


def test_adapter_off_is_the_frozen_model():
    be = sd1_backend()
    tr = Trainer(be, cfg())
    with torch.no_grad():
        for p in tr.adapter.up:
            p.normal_()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([100, 700]), tr._cond("circle").repeat(2)
    with torch.no_grad():
        base = be.predict_eps(x, t, c)
        tr.adapter.attach()
        with tr.adapter.disabled():
            off = be.predict_eps(x, t, c)
        on = be.predict_eps(x, t, c)
        tr.adapter.detach()
    assert torch.equal(off, base) and not torch.allclose(on, base)


def test_sdxl_style_conditioning_trains(tmp_path):
    enc = LoudEncoder()
    added = sdxl_added(1)

    def encode(ps):
        return Conditioning(enc.encode(ps), {k: v.repeat(len(ps), 1) for k, v in added.items()})

    be = DiffusersBackend(tiny_sdxl(), encode, ACP, (4, 8, 8))
    res = train_spm(be, cfg(iterations=2), tmp_path / "xl.safetensors")
    assert load_spm(res.spm_path).parameter_count > 0


def test_v_prediction_is_converted_to_epsilon():
    class PerfectV(torch.nn.Module):
        """Knows the true x0 and noise; answers v = sqrt(a) eps - sqrt(1-a) x0."""

        def __init__(self, x0, eps):
            super().__init__()
            self.x0, self.eps, self.w = x0, eps, torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, ctx, **kw):
            a = ACP[t].view(-1, 1, 1, 1)
            return type("Out", (), {"sample": a.sqrt() * self.eps - (1 - a).sqrt() * self.x0})()

    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([50, 900])
    a = ACP[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    be = DiffusersBackend(PerfectV(x0, eps), None, ACP, (4, 8, 8), prediction_type="v_prediction")
    assert torch.allclose(be.predict_eps(x_t, t, Conditioning(torch.zeros(2, 1, CTX))), eps, atol=1e-4)


@pytest.mark.parametrize("bad", [dict(targets=[]), dict(targets=[" "]), dict(templates=["no slot"]),
                                 dict(iterations=0), dict(lr=0.0), dict(max_denoising_steps=1), dict(anchors=-1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(SPMValueError):
        cfg(**bad)


@pytest.mark.parametrize("bad,message", [
    (dict(iterations=0), "^Iterations must be at least 1, not 0$"),
    (dict(iterations=2.5), "^Iterations must be a whole number, not 2.5$"),
    (dict(anchors=-1), "^Anchor count must be at least 0, not -1$"),
    (dict(lr=-1.0), "^lr must be a positive number, not -1.0$"),
    (dict(alpha="x"), "^alpha must be a number, not 'x'$"),
    (dict(guidance=float("nan")), "^Erase guidance must be at least 0"),
    (dict(seed=-1), "^Seed must be at least 0"),
    (dict(max_denoising_steps=1), "^Max denoising steps must be at least 2"),
    (dict(rank=True), "^Rank must be a number, not bool$"),
])
def test_the_config_is_the_one_check_of_its_numbers(bad, message):
    with pytest.raises(SPMValueError, match=message):
        cfg(**bad)


def test_the_config_stores_checked_numbers():
    c = cfg(iterations=4.0, rank="2", lr=1)
    assert (c.iterations, c.rank, c.lr) == (4, 2, 1.0)
    assert type(c.iterations) is int and type(c.rank) is int and type(c.lr) is float


def test_a_checkpoint_header_that_cannot_be_read_is_refused_by_name(tmp_path):
    part = train_spm(sd1_backend(), cfg(iterations=1), tmp_path / "a.safetensors", checkpoint_every=1)
    tensors, md = read_file(part.checkpoint_path)
    assert read_checkpoint(part.checkpoint_path) == (cfg(iterations=1), 1)
    for broken in ({**md, "config": "{"}, {**md, "config": "[]"}, {**md, "step": "x"},
                   {**md, "config": md["config"].replace('"rank"', '"rang"')}):
        path = write_file(tmp_path / "broken.ckpt.safetensors", tensors, broken, overwrite=True)
        with pytest.raises(SPMValueError, match="broken.ckpt.safetensors"):
            read_checkpoint(path)


@pytest.mark.parametrize("steps", [1, 7, 20, 30, 50])
def test_leading_timesteps_are_diffusers_ddim_leading(steps):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    assert torch.equal(leading_timesteps(steps, 1000), sched.timesteps.long())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_step_and_v_to_eps_follow_diffusers_ddim(prediction):
    """Our step (after converting v) lands where diffusers' DDIM (eta 0) steps from the same output."""
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          clip_sample=False, set_alpha_to_one=False, prediction_type=prediction)
    sched.set_timesteps(10)
    acp = sched.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ts = leading_timesteps(10, 1000)
    for i, t in enumerate(ts):
        out = torch.randn(2, 4, 8, 8, generator=g)
        tb = t.repeat(2)
        eps = out if prediction == "epsilon" else eps_from_v(out, x, acp, tb)
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else acp[0]
        ours = ddim_step(x, eps, acp[t], a_prev)
        theirs = sched.step(out, t, x, eta=0.0).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (prediction, int(t))
        x = theirs


def test_gradient_checkpointing_trains_the_same_spm_and_is_switched_back(tmp_path):
    """Recomputing activations in backward changes memory, not results; the UNet's own setting
    is restored afterwards, and tiny UNets train without it by default."""
    files = []
    for on in (False, True):
        backend = sd1_backend()
        assert not backend.unet.is_gradient_checkpointing
        seen = []
        res = train_spm(backend, cfg(iterations=3), tmp_path / f"ckpt_{on}.safetensors", gradient_checkpointing=on,
                        watch=lambda tr: seen.append(tr.backend.unet.is_gradient_checkpointing))
        assert set(seen) == {on} and not backend.unet.is_gradient_checkpointing
        files.append(load_spm(res.spm_path))
    default = sd1_backend()
    train_spm(default, cfg(iterations=1), tmp_path / "default.safetensors",
              watch=lambda tr: seen.append(tr.backend.unet.is_gradient_checkpointing))
    assert seen[-1] is False  # a tiny UNet: below CHECKPOINTING_FROM_PARAMETERS
    for key, lw in files[0].layers.items():
        assert torch.allclose(lw.up, files[1].layers[key].up, atol=1e-6), key
    assert any(lw.up.abs().max() > 0 for lw in files[1].layers.values())


# -- "pool" sampling: trajectories shared by many iterations ------------------------------------------

class PassCounter:
    """Counts UNet sample-passes (rows of every forward call) through a forward pre-hook."""

    def __init__(self, unet):
        self.rows = 0
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.rows += args[0].shape[0]


@pytest.mark.parametrize("sampling,surrogate", [("fresh", ""), ("pool", ""), ("pool", "square")])
def test_reported_passes_are_the_unet_rows_really_run(tmp_path, sampling, surrogate):
    be = sd1_backend()
    counter = PassCounter(be.unet)
    c = cfg(sampling=sampling, surrogates={"circle": surrogate} if surrogate else {})
    res = train_spm(be, c, tmp_path / "x.safetensors")
    counter.handle.remove()
    assert sum(h.passes for h in res.history) == counter.rows
    if sampling == "pool":
        # S=4 steps: 3 tuples per trajectory, 6 iterations need 2 trajectories of 2*4 passes; then
        # per iteration 1 frozen target + k=2 anchors (+1 for a named surrogate) and 1+k live passes
        named = 1 if surrogate else 0
        assert counter.rows == 2 * 2 * 4 + 6 * (1 + 2 + named + 3)
        assert res.history[0].passes == 16 + 6 + named  # the refill counts where it happens


def _pool_trainer(**kw):
    tr = Trainer(sd1_backend(), cfg(sampling="pool", templates=["{}", "a {}"], **kw))
    with torch.no_grad():
        for p in tr.adapter.up:  # a visibly non-zero adapter
            p.normal_()
    tr.adapter.attach()
    return tr


def _ddim(tr, x, i, eps_u, eps_c):
    eps = eps_u + tr.cfg.denoise_cfg * (eps_c - eps_u)
    return ddim_step(x, eps, tr.acp[tr.timesteps[i]], tr.acp[tr.timesteps[i + 1]])


def test_pool_holds_ddim_trajectories_at_the_right_timesteps():
    """Each step: frozen eps on "", the adapted eps on the target, CFG DDIM to the next x."""
    tr = _pool_trainer()
    tr._build_pool(0, 2)
    S, P, be = tr.cfg.max_denoising_steps, tr.pool, tr.backend
    for j in range(2):
        concept, template = tr._prompts[int(P["prompt"][j])]
        c = tr._cond(template.format(concept))
        for i in range(S):
            x, t = P["x"][j, i : i + 1], tr.timesteps[i : i + 1]
            with torch.no_grad():
                live = be.predict_eps(x, t, c)
                with tr.adapter.disabled():
                    frozen_u, frozen_c = be.predict_eps(x, t, tr._cond("")), be.predict_eps(x, t, c)
            assert torch.allclose(P["eps_u"][j, i : i + 1], frozen_u, atol=1e-5), (j, i)
            assert not torch.allclose(live, frozen_c, atol=1e-3)  # the adapter really took part
            if i + 1 < S:  # the next x is a CFG DDIM step with the ADAPTED target eps
                want = _ddim(tr, x, i, P["eps_u"][j, i : i + 1], live)
                assert torch.allclose(P["x"][j, i + 1 : i + 2], want, atol=1e-5), (j, i)
    x, t, _, _, spent = tr.pool_tuples(2 * (S - 1))  # every tuple once, without replacement
    assert spent == 0
    assert sorted(t.tolist()) == sorted(tr.timesteps[1:].tolist() * 2)
    for xi, ti in zip(x, t):
        i = int((tr.timesteps == ti).nonzero())
        assert any(torch.equal(xi, P["x"][j, i]) for j in range(2))
    _, _, _, _, spent = tr.pool_tuples(1)  # empty: refills (2 trajectories: 6 iterations left)
    assert spent == 2 * 2 * S and tr.pool_state == {"refills": 2, "pos": 1, "trajectories": 2}
    tr.adapter.detach()


def test_pool_frozen_eps_equal_a_fresh_frozen_pass_on_the_same_x_t():
    tr = _pool_trainer()
    x, t, eps_u, _, _ = tr.pool_tuples(4)
    with torch.no_grad():
        with tr.adapter.disabled():
            frozen_u = tr.backend.predict_eps(x, t, tr._cond("").repeat(4))
        live_u = tr.backend.predict_eps(x, t, tr._cond("").repeat(4))
    tr.adapter.detach()
    assert torch.allclose(eps_u, frozen_u, atol=1e-5)  # reused as eps_n for the surrogate ""
    assert not torch.allclose(eps_u, live_u, atol=1e-3)


def test_pool_sampling_resumes_bit_identically(tmp_path):
    c = cfg(sampling="pool", iterations=14, batch=2)  # pools of 2 trajectories = 6 tuples = 3 iterations
    straight = train_spm(sd1_backend(), c, tmp_path / "a.safetensors")
    stops = {"n": 0}

    def stop():
        stops["n"] += 1
        return stops["n"] > 5

    part = train_spm(sd1_backend(), c, tmp_path / "b.safetensors", should_stop=stop)
    assert part.steps == 5 and part.cancelled
    resumed = train_spm(sd1_backend(), c, tmp_path / "b.safetensors", resume_from=part.checkpoint_path)
    assert resumed.steps == 14
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    # the checkpoint keeps the half-drawn pool: resume spends no passes rebuilding it
    assert [h.passes for h in resumed.history] == [h.passes for h in straight.history[5:]]
    assert load_spm(resumed.spm_path).metadata.recipe["sampling"] == "pool"
    with pytest.raises(SPMValueError, match="sampling"):
        train_spm(sd1_backend(), cfg(iterations=14, batch=2), tmp_path / "c.safetensors", resume_from=part.checkpoint_path)


def test_unknown_sampling_is_refused():
    with pytest.raises(SPMValueError, match="sampling"):
        cfg(sampling="cached")
