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


class SPMRefusal(SPMError):
    """A generation that must not run. Hosts raise it where their own error handling cannot
    swallow it (inside the UNet call), so the request fails and its client sees the message.

    ``status_code`` and ``detail`` are instance attributes because the WebUI's API error handler
    reads them with ``vars(exc)``.
    """

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.status_code = self.status
        self.detail = message


class SPMRequestError(SPMRefusal):
    """The request's own SPM arguments cannot be honoured (bad args, unknown names, a negative
    strength while SPMs are enforced): the client's error."""

    status = 422


class ModerationUnavailable(SPMRefusal):
    """An operator-enforced SPM cannot act on this generation (missing, unreadable, for another
    model): nothing may be generated. The server's configuration, not the client's request."""

    status = 503


class SPMForbidden(SPMRefusal):
    """The operator's settings do not allow this request here (``--spm-lockdown``)."""

    status = 403
