"""The exceptions the library raises on bad input.

Library code raises these with a message that says what is wrong and how to fix it; only the CLI turns them
into one line on stderr and an exit code. Anything else escaping the library is a bug.
"""


class FlexOlmoError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class DataError(FlexOlmoError):
    """Training or evaluation text is missing, malformed or empty."""


class AnchorError(FlexOlmoError):
    """An anchor or model directory is missing, corrupt or of an unsupported architecture."""


class PackageError(FlexOlmoError):
    """An expert package is missing, corrupt, of an unknown format or trained on another anchor."""


class MergeError(FlexOlmoError):
    """A merge, add or remove cannot proceed (duplicate names, unknown experts, ...)."""


class CheckpointError(FlexOlmoError):
    """A training checkpoint cannot be resumed (missing, corrupt, or from a different configuration)."""


class TrustError(FlexOlmoError):
    """A key, signature, merged-model record or admission check refuses an input (see `flexolmo.trust`)."""


class DeviceError(FlexOlmoError):
    """The requested torch device is not a device, or not available on this machine or torch build."""


class ProxyError(FlexOlmoError):
    """A proxy file is missing or malformed, or cannot be used to tune this model's router."""


class ServiceError(FlexOlmoError):
    """The consortium service refuses a request or cannot reach its database; `status` is its HTTP code."""

    status = 400
