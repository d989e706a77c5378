"""sd-webui-spm core: Concept Semi-Permeable Membranes for any Stable Diffusion UNet.

Host-agnostic: nothing here imports the WebUI. Importing the package does no work.
"""

from .errors import (
    ArchitectureMismatch,
    SPMError,
    SPMFormatError,
    SPMKeyError,
    SPMRuntimeError,
    SPMShapeError,
    SPMValueError,
    UnresolvedKeysError,
)
from .format.metadata import Slice, SPMMetadata
from .format.spm_file import LayerWeights, SPMFile, load_spm
from .runtime.gating import ConceptEncoder, GateSettings
from .runtime.session import Session

__version__ = "0.1.0"

__all__ = [
    "ArchitectureMismatch", "ConceptEncoder", "GateSettings", "LayerWeights", "SPMError",
    "SPMFile", "SPMFormatError", "SPMKeyError", "SPMMetadata", "SPMRuntimeError", "SPMShapeError",
    "SPMValueError", "Session", "Slice", "UnresolvedKeysError", "load_spm",
]
