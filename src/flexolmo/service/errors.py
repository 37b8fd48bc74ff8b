"""The service's refusals, each with the HTTP status the app answers it with."""

from __future__ import annotations

from flexolmo.core.errors import ServiceError


class Unauthorized(ServiceError):
    """The request is not signed by a known member's key, or its nonce or timestamp is refused."""

    status = 401


class Forbidden(ServiceError):
    """A member acting on another member's expert."""

    status = 403


class NotFound(ServiceError):
    """No such member, expert, version or active set."""

    status = 404


class Conflict(ServiceError):
    """The state does not allow it (already published, nothing to publish, not initialised)."""

    status = 409


class TooLarge(ServiceError):
    """An upload beyond the service's limit or beyond the free disk."""

    status = 413


class StoreUnavailable(ServiceError):
    """The package store (a directory or an S3 bucket) cannot be read or written; the request may be retried."""

    status = 503
