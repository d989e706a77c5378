"""The SPM tab's host inside AUTOMATIC1111: the loaded model, the WebUI's job queue and progress bar."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ...errors import SPMRuntimeError
from ...runtime.gating import GateSettings
from ...ui.host import GateProbe
from .extension import Extension
from .model import model_arch, unet_of


class WebUIHost:
    """:class:`lib_spm.ui.host.UIHost` for the WebUI: jobs hold its queue lock and its ``shared.state``."""

    def __init__(self, ext: Extension):
        self.ext = ext
        self.library = ext.library
        self.jobs = ext.jobs

    @property
    def _shared(self):
        return self.ext.shared

    def _model(self):
        model = getattr(self._shared, "sd_model", None)
        if model is None:
            raise SPMRuntimeError("no Stable Diffusion model is loaded")
        return model

    def model_name(self) -> str:
        info = getattr(self._model(), "sd_checkpoint_info", None)
        return getattr(info, "title", None) or "(unnamed model)"

    def model_arch(self) -> str | None:
        try:
            return model_arch(self._model())
        except SPMRuntimeError:
            return None

    def device_type(self) -> str:
        """Where the WebUI computes (``cuda``, ``mps``, ``cpu``), for the Train panel's estimate."""
        try:
            return self.ext.webui.module("devices").device.type
        except (ImportError, AttributeError):
            return "cpu"

    def backend(self, resolution: int):
        from .trainer import WebUIBackend

        if self.ext.read_only:
            raise SPMRuntimeError(self.ext.read_only)
        # previews are images of the model without the enforced SPMs: none while an operator enforces
        return WebUIBackend(self._model(), resolution, previews=not self.ext.policy.enforcing)

    @contextlib.contextmanager
    def job(self, title: str):
        """The WebUI's queue lock (no generation runs meanwhile) and progress bar; the controller
        drops what a generation left on the model and lets this job's UNet calls through."""
        state = self._shared.state
        with self.ext.webui.module("call_queue").queue_lock, self.ext.controller.trusted():
            state.begin(job=title)
            try:
                yield
            finally:
                state.end()

    def interrupted(self) -> bool:
        state = self._shared.state
        return bool(getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False))

    def progress(self, done: int, total: int, text: str) -> None:
        state = self._shared.state
        state.job_count = 1
        state.sampling_steps = total
        state.sampling_step = done
        state.textinfo = text

    def checkpoints(self) -> dict[str, Path]:
        sd_models = self.ext.webui.module("sd_models")
        return {title: Path(info.filename) for title, info in sd_models.checkpoints_list.items()
                if str(info.filename).endswith(".safetensors")}

    def loaded_checkpoint(self) -> str | None:
        info = getattr(getattr(self._shared, "sd_model", None), "sd_checkpoint_info", None)
        title = getattr(info, "title", None)
        return title if title in self.checkpoints() else None

    def checkpoint_dir(self) -> Path:
        ckpt_dir = getattr(self._shared.cmd_opts, "ckpt_dir", None)
        return Path(ckpt_dir) if ckpt_dir else Path(self.ext.webui.module("sd_models").model_path)

    # -- the Test panel --------------------------------------------------------------------------
    def gate_defaults(self) -> GateSettings:
        d = self.ext.default_args()
        return GateSettings(enabled=d["ft"], factor=d["factor"], metric=d["metric"])

    def enforced(self) -> list[tuple[str, float, GateSettings]]:
        gate = self.ext.controller.enforced_gate
        return [(e.name, e.strength, gate) for e in self.ext.policy.enforced]

    @contextlib.contextmanager
    def gate_probe(self):
        """The loaded model under the WebUI's queue lock, so the report's hooks never meet a generation."""
        from .probe import NOTE, WebUIPromptRows
        from .rows import WebUIConcepts, tokens_for

        module = self.ext.webui.module
        with module("call_queue").queue_lock:
            sd_model = self._model()
            tokens = tokens_for(sd_model)  # the WebUI's tokenizer, or Forge's text engine
            rows = WebUIPromptRows(sd_model, tokens, module("prompt_parser"), module("extra_networks"),
                                   module("devices").autocast)
            yield GateProbe(unet_of(sd_model), WebUIConcepts(sd_model, tokens=tokens), rows, NOTE)

    def images_unavailable(self) -> str | None:
        from .probe import NO_IMAGES

        return NO_IMAGES

    def test_images(self, prompts, spms, gate, seed):
        return None
