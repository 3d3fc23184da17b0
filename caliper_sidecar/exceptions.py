"""The domain's exceptions. Delivery outcomes are exceptions with fields, so the dispatcher's
decision (retry when, refuse which, auth failed why) is carried by the value itself."""

from __future__ import annotations

from pathlib import Path


class SidecarError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SidecarError):
    """Raised when the configuration is wrong; the message names the key at fault."""


class ReplicasDisagree(ConfigError):
    """Raised at start when live replicas on the same PostgreSQL outbox deliver differently
    (another platform, endpoint or dedupe window); the message names the keys."""


class CannotListen(SidecarError):
    """Raised when the receiver cannot bind its address (in use, or not this machine's)."""


class OutboxLocked(SidecarError):
    """Raised when another `run` process already owns the outbox file."""


class OutboxUnusable(SidecarError):
    """Raised at start when the outbox file cannot be opened as an outbox (not a database, a
    directory, a place that cannot be written); the message names `outbox.path`."""


class SchemaTooNew(SidecarError):
    """Raised when the outbox (either backend) was written by a newer release than this one."""


class ArchiveUnusable(ConfigError):
    """Raised at start when the archive's `dir` cannot be created or written (a regular file
    in its path, no permission, a read-only disk); the message names the dir."""


class OutboxUnavailable(SidecarError):
    """Raised when an append cannot be committed now; the caller answers 503 + Retry-After.

    `reason` is a short machine-readable word ("outbox_full", "disk_full", "shutting_down",
    "storage_error"). `detail` is what the storage said, for the log only: answers to apps
    never carry storage internals (a database's column names, its address).
    """

    def __init__(
        self, reason: str, message: str, retry_after_s: int = 5, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.detail = detail


def storage_error(error: BaseException, retry_after_s: int = 5) -> OutboxUnavailable:
    """A storage failure as apps are told of it: that it happened; what it was is the detail."""
    return OutboxUnavailable(
        "storage_error",
        "the outbox cannot be used now; try again (what failed is in the sidecar's log, under "
        "this answer's request_id)",
        retry_after_s,
        detail=f"{type(error).__name__}: {error}",
    )


class EventTooLarge(SidecarError):
    """Raised when one event can never fit an envelope of `upstream.batch_max_bytes`."""


class DeliveryOutcome(SidecarError):
    """Base of the ways a send can fail; the dispatcher turns each into an outbox operation."""


class RetryLater(DeliveryOutcome):
    """The platform or the network failed transiently: keep the events, retry after a delay.

    `retry_after_s` is what the platform asked for (Retry-After), or None to use the backoff.
    """

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class EndpointFailed(RetryLater):
    """The endpoint itself fails (404, 405, 410: a mistyped URL, a maintenance page, a proxy's
    route): no event's fault, so the events stay queued and are retried with backoff."""


class UnexpectedAnswer(RetryLater):
    """A 2xx that is not the destination's answer (a web filter's page, a captive portal, a
    proxy): nothing was delivered and no event is at fault, so the events stay queued and are
    retried with backoff."""


class ArchiveUnavailable(RetryLater):
    """Raised when events cannot be written to the archive now (a full disk, a dir made
    unwritable, an I/O error): what was written of them is cut back, none counts as archived,
    so they stay queued and are retried with backoff. `path` is the file or dir at fault."""

    def __init__(self, reason: str, path: Path, errno: int | None = None) -> None:
        super().__init__(reason)
        self.path = path
        self.errno = errno


class Refused(DeliveryOutcome):
    """The platform refused the batch for good (a 4xx other than auth or rate limits)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status
        self.body = body


class AuthFailed(DeliveryOutcome):
    """Credentials were refused (token endpoint or a persistent 401/403); events stay queued."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
