"""Prompts as the WebUI turns them into rows, for the Test panel and ``/spm/v1/gates``.

Extra-network tags (``<lora:...>``, ``<spm:...>``) are taken out by the WebUI's own
``extra_networks.parse_prompt``, as before encoding at generation (tags do not choose SPMs here:
the panel's list does). The WebUI's ``prompt_parser`` splits ``AND`` and schedules prompt editing; each row is encoded
by ``sd_model.get_learned_conditioning`` (its 75-token chunks concatenated, as the UNet receives
them) and tokenized by :class:`~.rows.PromptTokens` (chunks filled to 75, as ``WebUIRows`` hands
rows to the runtime). Images are not made here: the WebUI generates through txt2img's processing,
which this panel does not drive (compare with the accordion at a fixed seed instead).
"""

from __future__ import annotations

import contextlib

import torch

from ...errors import SPMShapeError
from ...runtime.gate_report import Part
from .rows import CHUNK, PromptTokens

STEPS = 20  # prompt editing is shown at this many sampling steps
NOTE = (f"Rows as the WebUI makes them: each AND part, prompt editing at {STEPS} steps, extra-network tags "
        "removed (they choose no SPM here). Textual-inversion embeddings count as placeholder tokens, as at "
        "generation.")
NO_IMAGES = ("Gates only in the WebUI: its images come from txt2img/img2img, which this panel does not run. "
             "Compare at a fixed seed with the SPM accordion on and off.")


class WebUIPromptRows:
    """:class:`~lib_spm.runtime.gate_report.PromptRows` for the loaded WebUI model."""

    chunk = CHUNK

    def __init__(self, sd_model, tokens: PromptTokens, parser, networks, autocast=contextlib.nullcontext):
        self.sd_model, self.tokens, self.parser, self.networks = sd_model, tokens, parser, networks
        self.autocast = autocast

    def parts(self, prompt: str) -> list[Part]:
        prompt, _ = self.networks.parse_prompt(prompt)
        (image,), flat, _ = self.parser.get_multicond_prompt_list([prompt])
        out = []
        for j, (i, weight) in enumerate(image):
            base = f"AND {j + 1}" if len(image) > 1 else ""
            if float(weight) != 1.0:
                base += f" (weight {float(weight):g})"
            schedule = self.parser.get_learned_conditioning_prompt_schedules([flat[i]], STEPS)[0]
            start = 1
            for end, text in schedule:
                steps = f"steps {start}-{end}" if len(schedule) > 1 else ""
                out.append(Part(", ".join(s for s in (base.strip(), steps) if s), str(text)))
                start = int(end) + 1
        return out

    def conditioning(self, text: str) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            cond = self.sd_model.get_learned_conditioning([text])
        cond = cond["crossattn"] if isinstance(cond, dict) else cond
        if not isinstance(cond, torch.Tensor):
            raise SPMShapeError(f"get_learned_conditioning gave a {type(cond).__name__}, not a tensor")
        return cond

    def row_tokens(self, text: str) -> tuple[int, ...]:
        return self.tokens.row(text)
