"""Typed errors. Every failure a user can cause has its own class and a one-line message.

All derive from :class:`SPMError`, so a host can catch one type and show ``str(exc)``.
"""


class SPMError(Exception):
    """Base class of every error lib_spm raises on purpose."""


class SPMFormatError(SPMError):
    """The file is not a readable safetensors SPM (wrong suffix, pickle, truncated, bad header)."""


class SPMKeyError(SPMError):
    """The file has keys an SPM cannot have (unknown suffixes, text-encoder keys, duplicates)."""


class SPMShapeError(SPMError):
    """Tensor shapes or ranks are inconsistent within the file or with its metadata."""


class SPMValueError(SPMError):
    """Tensors hold NaN/Inf, or a setting is out of range."""


class ArchitectureMismatch(SPMError):
    """The SPM was made for another model architecture than the one it is applied to."""


class UnresolvedKeysError(SPMError):
    """Some file keys map to no module of the model. Conversions are total: nothing is dropped."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = list(keys)


class SPMRuntimeError(SPMError):
    """The runtime was used in a way it cannot honour (e.g. batch rows it has no gates for)."""


class SPMNameError(SPMValueError):
    """A name the SPM folder cannot hold: unsafe, reserved, too long in bytes, or spelled twice."""


class SPMFolderError(SPMError):
    """A file operation in the SPM folder failed (permissions, a full disk, a file that vanished)."""
