"""``backend/sampling/sampling_function.py``: how Forge lays a step's rows into UNet calls.

``sampling_function`` makes one entry per ``AND`` sub-prompt index (the j-th sub-prompt of every
image: ``compile_weighted_conditions`` transposes ``cond_composition``) and one uncond entry,
none at CFG 1. ``calc_cond_uncond_batch`` queues ``[cond_0, ..., cond_n-1, uncond]`` and runs, per
UNet call, the queued entries that concatenate with the first one, in reverse order, as many as
memory allows (``max_chunks`` stands for the free memory here); the call's
``transformer_options["cond_or_uncond"]`` flags each chunk. Conditionings of different lengths
concatenate when the longer is at most 4 times their common multiple, each repeated to it.

Stand-in only: ``record`` (a list in ``model_options``) receives each call's step (``step``) and
true chunk labels, ``("cond", j)`` or ``("uncond",)``, for tests to compare with what the
extension inferred.
"""

from __future__ import annotations

import math

import torch

COND, UNCOND = 0, 1


def compile_conditions(cond, label):
    if cond is None:
        return None
    return [{"crossattn": cond, "strength": 1.0, "label": label}]


def compile_weighted_conditions(cond, weights):
    results = []
    for j, cond_pre in enumerate(map(list, zip(*weights))):
        indices = [i for i, _ in cond_pre]
        results.append({"crossattn": cond[indices], "strength": cond_pre[-1][1], "label": ("cond", j)})
    return results


def _can_concat(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape[1] == b.shape[1]:
        return True
    return math.lcm(a.shape[1], b.shape[1]) // min(a.shape[1], b.shape[1]) <= 4


def _cat(conds: list[torch.Tensor]) -> torch.Tensor:
    n = math.lcm(*[c.shape[1] for c in conds])
    return torch.cat([c.repeat(1, n // c.shape[1], 1) for c in conds])


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond, out_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    out_uncond, out_uncond_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    to_run = [(c, COND) for c in cond] + ([(u, UNCOND) for u in uncond] if uncond is not None else [])
    max_chunks = model_options.get("max_chunks") or len(to_run)
    while to_run:
        first = to_run[0][0]["crossattn"]
        to_batch_temp = [i for i in range(len(to_run)) if _can_concat(to_run[i][0]["crossattn"], first)]
        to_batch_temp.reverse()
        to_batch = to_batch_temp[:1]
        for i in range(1, len(to_batch_temp) + 1):
            amount = to_batch_temp[:len(to_batch_temp) // i]
            if len(amount) <= max_chunks:
                to_batch = amount
                break
        entries, cond_or_uncond = [], []
        for i in to_batch:
            o = to_run.pop(i)
            entries.append(o[0])
            cond_or_uncond.append(o[1])
        chunks = len(cond_or_uncond)
        if "record" in model_options:
            model_options["record"].append((model_options.get("step"), [e["label"] for e in entries]))
        transformer_options = {"cond_or_uncond": cond_or_uncond[:], "sigmas": timestep}
        output = model.apply_model(torch.cat([x_in] * chunks), torch.cat([timestep] * chunks),
                                   c_crossattn=_cat([e["crossattn"] for e in entries]),
                                   transformer_options=transformer_options).chunk(chunks)
        for o, e in enumerate(entries):
            if cond_or_uncond[o] == COND:
                out_cond += output[o] * e["strength"]
                out_count += e["strength"]
            else:
                out_uncond += output[o]
                out_uncond_count += 1
    return out_cond / out_count, out_uncond / out_uncond_count


def sampling_function(unet_patcher, denoiser_params, cond_scale, cond_composition, timestep):
    """One CFG step: the guided prediction (eps, as the stand-in's model predicts)."""
    model_options = unet_patcher.model_options
    uncond = compile_conditions(denoiser_params.text_uncond, ("uncond",))
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    if math.isclose(cond_scale, 1.0):
        uncond = None
    x = denoiser_params.x
    cond_pred, uncond_pred = calc_cond_uncond_batch(unet_patcher.model, cond, uncond, x,
                                                    timestep.expand(x.shape[0]), model_options)
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale
