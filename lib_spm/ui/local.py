"""A :class:`~lib_spm.ui.host.UIHost` for a local model: the shipped shapes world.

``python -m lib_spm ui`` serves the SPM tab through it, and the browser test drives that server.
The world is loaded on first use; one lock is the job slot, as the WebUI's queue lock is there.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path

from ..operations.library import SPMLibrary
from ..runtime.gate_report import Part
from ..runtime.gating import GateSettings
from ..training.jobs import JobRunner
from .host import GateProbe

log = logging.getLogger(__name__)


class LocalHost:
    """The shapes world, an SPM folder, and (for baking) a folder of single-file checkpoints."""

    def __init__(self, spm_dir: str | Path, checkpoint_dir: str | Path | None = None,
                 world_dir: str | Path | None = None):
        self.library = SPMLibrary(spm_dir)
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else Path(spm_dir) / "checkpoints"
        self._world_dir = world_dir
        self._world = None
        self._world_lock = threading.Lock()
        self._job = threading.Lock()
        self._interrupt = threading.Event()
        self.jobs = JobRunner()  # the current training job outlives a page reload

    # -- the model -------------------------------------------------------------------------------
    @property
    def world(self):
        with self._world_lock:
            if self._world is None:
                from ..world.model import WEIGHTS, load_world

                self._world = load_world(self._world_dir or WEIGHTS)
            return self._world

    def model_name(self) -> str:
        return "shapes world"

    def model_arch(self) -> str | None:
        return None  # the world is none of sd1/sd2/sdxl; its SPMs say so by leaving arch unset

    def device_type(self) -> str:
        return "cpu"  # the shapes world trains on the CPU

    def backend(self, resolution: int):
        """The world's trainer backend (with ``decode`` for previews); the world only knows 32 px
        images, whatever ``resolution`` says."""
        from ..world.pipeline import world_backend

        return world_backend(self.world)

    # -- jobs ------------------------------------------------------------------------------------
    @contextmanager
    def job(self, title: str):
        with self._job:
            self._interrupt.clear()
            log.info("%s: started", title)
            try:
                yield
            finally:
                log.info("%s: ended", title)

    def interrupt(self) -> None:
        """What the host's Interrupt button would do: the running job stops at its next check."""
        self._interrupt.set()

    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def progress(self, done: int, total: int, text: str) -> None:
        log.debug("%d/%d %s", done, total, text)

    # -- the Test panel --------------------------------------------------------------------------
    def gate_defaults(self) -> GateSettings:
        return GateSettings()  # what WorldPipeline applies unless told otherwise

    def enforced(self) -> list:
        return []  # no operator here

    @contextmanager
    def gate_probe(self):
        """The world under the job slot: a training job's hooks and the report's never meet."""
        with self._job:
            world = self.world
            yield GateProbe(world.unet, world.text_encoder, WorldRows(world.text_encoder),
                            note="The shapes world encodes one 77-token chunk per prompt and has no AND: "
                                 "one row per prompt.")

    def images_unavailable(self) -> str | None:
        return None

    def test_images(self, prompts, spms, gate: GateSettings, seed: int):
        """32 px world images (shown 4x, nearest) without and with the SPMs, same noise."""
        import torch

        from ..world.pipeline import WorldPipeline

        with self._job:
            pipe = WorldPipeline(self.world)
            before = pipe.generate(list(prompts), seed=seed)
            with pipe.applied(list(spms), gate):
                after = pipe.generate(list(prompts), seed=seed)

        def pixels(img: torch.Tensor):
            return (img.permute(1, 2, 0) * 255).round().byte().repeat_interleave(4, 0).repeat_interleave(4, 1).numpy()

        return [(pixels(b), pixels(a)) for b, a in zip(before, after)]

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoints(self) -> dict[str, Path]:
        folder = self._checkpoint_dir
        return {p.name: p for p in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}

    def loaded_checkpoint(self) -> str | None:
        return None  # the world is not a single-file checkpoint

    def checkpoint_dir(self) -> Path:
        return self._checkpoint_dir


class WorldRows:
    """PromptRows of :class:`~lib_spm.world.pipeline.WorldPipeline`: a row per prompt, its
    encoding and token list exactly as the pipeline hands them to the UNet and the session."""

    chunk = 77

    def __init__(self, text_encoder):
        self.te = text_encoder

    def parts(self, prompt: str) -> list[Part]:
        return [Part("", prompt)]

    def conditioning(self, text: str):
        return self.te.encode([text])

    def row_tokens(self, text: str) -> tuple[int, ...]:
        return tuple(self.te.tokens([text])[0])
