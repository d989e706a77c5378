"""What the SPM tab needs from whatever runs it: the WebUI, or a standalone server on the shapes world.

The panels never import the WebUI; ``lib_spm.hosts.webui.tab`` implements this protocol for
AUTOMATIC1111 and ``lib_spm.ui.local`` for a local model (the browser test serves the shapes world
through it).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import torch.nn as nn

from ..format.spm_file import SPMFile
from ..operations.library import SPMLibrary
from ..runtime.gate_report import PromptRows
from ..runtime.gating import GateSettings
from ..training.jobs import JobRunner
from ..training.trainer import Backend

if TYPE_CHECKING:
    from ..runtime.gating import ConceptEncoder


@dataclass(frozen=True)
class GateProbe:
    """What the Test panel scores prompts with: the loaded model's UNet, its concept encoder and
    the host's way of turning a prompt into rows (``AND`` parts, chunks)."""

    unet: nn.Module
    encoder: ConceptEncoder
    rows: PromptRows
    note: str = ""  # what the host's rows do not model, shown under the table


class UIHost(Protocol):
    library: SPMLibrary  # the SPM folder
    jobs: JobRunner  # the one running job, process-wide: a reloaded page finds it again

    def model_name(self) -> str:
        """A label for the loaded model (the WebUI's checkpoint title)."""

    def model_arch(self) -> str | None:
        """``sd1`` / ``sd2`` / ``sdxl`` of the loaded model; None when no model is loaded."""

    def device_type(self) -> str:
        """``cpu`` / ``cuda`` / ``mps``: where training would run (the Train panel's estimate)."""

    def backend(self, resolution: int) -> Backend:
        """The trainer's backend for the loaded model, latents for ``resolution`` pixels square.

        The backend may also have ``decode(latents) -> [B, 3, H, W] in [0, 1]`` for previews.
        """

    def job(self, title: str) -> AbstractContextManager:
        """Hold the host's job slot while training/merging: generation and jobs never overlap."""

    def interrupted(self) -> bool:
        """The host's own Interrupt button was pressed (checked between steps)."""

    def progress(self, done: int, total: int, text: str) -> None:
        """Mirror progress into the host's own progress bar."""

    def checkpoints(self) -> dict[str, Path]:
        """Checkpoints that can be baked into: title -> single-file safetensors path."""

    def loaded_checkpoint(self) -> str | None:
        """Title (a key of :meth:`checkpoints`) of the loaded checkpoint, if it is a file."""

    def checkpoint_dir(self) -> Path:
        """Where baked checkpoints are written (never over an existing file)."""

    def gate_defaults(self) -> GateSettings:
        """The gate settings a generation uses unless the user changes them (the accordion's defaults)."""

    def enforced(self) -> list[tuple[str, float, GateSettings]]:
        """The operator's enforced SPMs (name, strength) and the gate they act with; empty when none."""

    def gate_probe(self) -> AbstractContextManager[GateProbe]:
        """The loaded model held for scoring prompts: no generation or job runs meanwhile, since
        the report attaches (and detaches) hooks on the UNet while it scores."""

    def images_unavailable(self) -> str | None:
        """Why the Test panel shows gates only, or None when :meth:`test_images` makes images."""

    def test_images(self, prompts: Sequence[str], spms: Sequence[tuple[SPMFile, float]], gate: GateSettings,
                    seed: int) -> list[tuple[object, object]] | None:
        """Per prompt, images (``[H, W, 3]`` uint8 arrays) without and with ``spms`` for ``seed``;
        None where the host cannot generate them cleanly (the Test panel then shows gates only)."""
