"""The words the sidecar reports its states and outcomes in, one enum each: what the upstream is
doing, why an event was dead-lettered, where an event's journey stands, how a platform job ended.
The metrics' label sets, the status document and the journeys take them from here."""

from __future__ import annotations

from enum import StrEnum


class UpstreamState(StrEnum):
    OK = "ok"
    BACKING_OFF = "backing_off"
    AUTH_FAILED = "auth_failed"
    #: 404/405/410 for envelopes: the endpoint is wrong or gone
    ENDPOINT_FAILED = "endpoint_failed"
    #: every event refused with the same answer: the platform's failure
    REFUSING = "refusing"
    #: a 2xx that is not the platform's answer (a web filter's page, a captive portal)
    UNEXPECTED_ANSWER = "unexpected_answer"


class DeadLetterReason(StrEnum):
    #: the platform refused the event alone (a 4xx after the batch was split down to it)
    REFUSED = "refused"
    MAX_ATTEMPTS = "max_attempts"
    MAX_AGE = "max_age"
    #: its platform job failed and named it (or named none)
    PLATFORM_FAILED = "platform_failed"
    #: a destination with `when_full = "dead_letter"` lagged until its waiting events would
    #: have filled the outbox
    DESTINATION_LAGGING = "destination_lagging"


class JourneyMark(StrEnum):
    """What happened to an event at a destination beside its delivery: a mark in its journey."""

    #: queued again from an archive (`caliper-sidecar replay`)
    REPLAYED = "replayed"
    #: reconciliation found the destination holds it
    VERIFIED = "verified"
    #: reconciliation found the destination does not hold it
    MISSING = "missing"
    #: sent again after it was found missing
    RESENT = "resent"
    #: never seen at the destination after re-sends, for as long as reconciliation tries
    GIVEN_UP = "given_up"


class JourneyState(StrEnum):
    WAITING = "waiting"
    DELIVERED = "delivered"
    AWAITING_CONFIRMATION = "awaiting_confirmation"
    CONFIRMED = "confirmed"
    UNCONFIRMED = "unconfirmed"
    DEAD_LETTERED = "dead_lettered"


class JobOutcome(StrEnum):
    """How a platform job the sidecar followed ended."""

    COMPLETED = "completed"
    FAILED = "failed"
    UNCONFIRMED = "unconfirmed"


class ReconcileResult(StrEnum):
    """What a check of a delivered event against the platform's listing found (the metric's
    `result`; journeys mark a held event `verified`)."""

    HELD = "held"
    MISSING = "missing"
    RESENT = "resent"
    GIVEN_UP = "given_up"
