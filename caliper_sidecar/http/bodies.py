"""Every JSON body the sidecar answers with, as a msgspec Struct: the routes build these, the
one encoder writes them (`errors.json_response`), and the OpenAPI document's schemas are
generated from them (`openapi.py`), so that what is documented is what is sent.

Field names are the wire's (TimeBack's camelCase where its SDK reads them). A field that may be
absent has the default UNSET; one that is always present but may be null is `X | None`.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, UnsetType

from caliper_sidecar.states import JourneyMark, JourneyState, UpstreamState
from caliper_sidecar.validation.issues import Finding

#: an ISO 8601 UTC time with milliseconds (`codec.utc_from_timestamp`)
Time = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]
Count = Annotated[int, msgspec.Meta(ge=0)]


def _says(description: str) -> msgspec.Meta:
    """A field's meaning, in the OpenAPI document."""
    return msgspec.Meta(description=description)


OAuthErrorCode = Literal["invalid_request", "unsupported_grant_type", "invalid_client"]


class Body(msgspec.Struct):
    """An answer's body; a field left UNSET is not written (msgspec never writes UNSET). Each
    body is kw_only: msgspec does not inherit that."""


# -- errors ------------------------------------------------------------------------------------


class Error(Body, kw_only=True):
    """The one error shape of every route."""

    error: str
    message: str
    request_id: Annotated[
        str | UnsetType,
        _says("under which the log holds what failed in storage (not told to apps)"),
    ] = UNSET


class Invalid(Body, kw_only=True):
    """A request refused because an event breaks a rule; nothing of it was stored."""

    error: Literal["invalid_events"] = "invalid_events"
    message: str
    errors: list[Finding]
    errors_total: Annotated[int, _says("every problem found (at most the first few are listed)")]


class OAuthError(Body, kw_only=True, forbid_unknown_fields=True):
    """A refused token request: RFC 6749's error, and the sidecar's own `message` beside it."""

    error: OAuthErrorCode
    error_description: str
    message: str


# -- ingest ------------------------------------------------------------------------------------


class Accepted(Body, kw_only=True):
    """`POST /v1/events`: every event is committed to the outbox."""

    accepted: Count
    duplicates: Count
    ids: list[str]
    warnings: list[Finding] | UnsetType = UNSET
    warnings_total: int | UnsetType = UNSET


class CaliperAccepted(Body, kw_only=True):
    """TimeBack's answer (its SDK reads `jobId`); IMS Caliper sensors look only at the status."""

    status: Literal["success"] = "success"
    jobId: str
    eventsAccepted: Count


class Validation(Body, kw_only=True):
    """`POST /caliper/event/validate`: the verdict; nothing is stored."""

    status: Literal["success", "error"]
    errors: list[Finding] | UnsetType = UNSET
    errors_total: int | UnsetType = UNSET
    warnings: list[Finding] | UnsetType = UNSET
    warnings_total: int | UnsetType = UNSET


# -- TimeBack's API for SDKs -------------------------------------------------------------------


class Token(Body, kw_only=True, forbid_unknown_fields=True):
    """An access token for an app, accepted wherever a sender token is."""

    access_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int
    scope: str | UnsetType = UNSET


class JobResult(Body, kw_only=True):
    allocatedId: str
    externalId: str


class JobReturn(Body, kw_only=True):
    status: Literal["success", "error"]
    results: list[JobResult]


class Job(Body, kw_only=True, forbid_unknown_fields=True):
    id: str
    state: Literal["waiting", "active", "completed", "failed"]
    returnValue: JobReturn | None = None
    processedOn: Time | None = None
    failedReason: str | UnsetType = UNSET


class JobStatus(Body, kw_only=True):
    """A job this sidecar answered an app with, in the shape of TimeBack's `JobStatus`."""

    job: Job


class DeadLetterOutcome(Body, kw_only=True, forbid_unknown_fields=True):
    reason: str
    status: int | None
    response: str
    dead_lettered_at: Time | None


#: where an event is at one of [[destinations]] (outbox/records.py's DestinationPart.state)
DestinationJourneyState = Literal["waiting", "delivered", "dead_lettered"]


class DestinationJourney(Body, kw_only=True, forbid_unknown_fields=True):
    """An event's way to one of [[destinations]]."""

    state: DestinationJourneyState
    attempts: Annotated[Count, _says("the failed sends there")]
    last_error: str | None
    reason: Annotated[str | None, _says("why it was dead-lettered there")]


class Mark(Body, kw_only=True, forbid_unknown_fields=True):
    """Something that happened to an event at a destination beside its delivery."""

    at: Time | None
    what: Annotated[
        JourneyMark,
        _says(
            "replayed: queued again from an archive (`caliper-sidecar replay`); verified: "
            "reconciliation found the destination holds it; missing: it found it does not; "
            "resent: sent again after it was found missing; given_up: never seen there "
            "after re-sends, for as long as reconciliation tries"
        ),
    ]
    destination: Annotated[str, _says("upstream ([upstream]), or a [[destinations]] name")]
    detail: str | None


class Journey(Body, kw_only=True, forbid_unknown_fields=True):
    """One event's way through the sidecar (`GET /v1/events/{id}`), each destination's too."""

    id: str
    state: JourneyState
    received_at: Time | None
    attempts: Annotated[Count, _says("every send of the event, the one that succeeded included")]
    first_attempt_at: Time | None
    last_attempt_at: Time | None
    last_error: str | None
    delivered_at: Time | None
    platform_job: str | None
    platform_id: str | None
    confirmed_at: Time | None
    unconfirmed_reason: Annotated[
        str | None, _says("why an `unconfirmed` event can never be confirmed")
    ]
    sensor: Annotated[str | None, _says("the sensor of the app's envelope (null: sent bare)")]
    sender: Annotated[
        str | None, _says("the label of the sender token it came with (receiver.tokens_file)")
    ]
    dead_letter: DeadLetterOutcome | UnsetType = UNSET
    destinations: Annotated[
        dict[str, DestinationJourney] | UnsetType,
        _says(
            "its part at each of [[destinations]], by name (absent without destinations, or "
            "for an event received before they were added)"
        ),
    ] = UNSET
    marks: Annotated[
        list[Mark] | UnsetType,
        _says(
            "what happened to it at its destinations beside delivery, oldest first (absent "
            "when nothing did); kept as long as the event is"
        ),
    ] = UNSET


# -- operators ---------------------------------------------------------------------------------


class Health(Body, kw_only=True):
    status: str
    reason: str | UnsetType = UNSET


class OutboxStatus(Body, kw_only=True, forbid_unknown_fields=True):
    events: int
    bytes: int
    oldest_age_s: float | None
    dead_letters: int
    delivered_total: int
    dead_lettered_total: int


class PlatformJobsStatus(Body, kw_only=True, forbid_unknown_fields=True):
    following: Count
    unconfirmed: Count


ConcurrencyLimit = Annotated[
    Count,
    _says(
        "envelopes it may have in flight at once now: the adaptive limit, from 1 up to "
        "concurrency_ceiling as the destination's answers allow"
    ),
]
ConcurrencyCeiling = Annotated[Count, _says("its `concurrency`: the most the limit reaches")]


class UpstreamStatus(Body, kw_only=True, forbid_unknown_fields=True):
    platform: Literal["learnwith-ai", "beyond-ai", "caliper"]
    endpoint: str
    state: UpstreamState
    last_error: str | None
    last_error_at: Time | None
    retry_in_s: Annotated[float, msgspec.Meta(ge=0)]
    in_flight: Count
    token_expires_at: Time | None
    concurrency_limit: ConcurrencyLimit
    concurrency_ceiling: ConcurrencyCeiling
    platform_jobs: PlatformJobsStatus | UnsetType = UNSET


class DestinationStatus(Body, kw_only=True, forbid_unknown_fields=True):
    """One destination's delivery: [upstream] (named "upstream") or one of [[destinations]]."""

    name: str
    kind: Annotated[
        Literal["caliper", "archive"],
        _says(
            "how it delivers: Caliper envelopes to an endpoint ([upstream] is one; its platform "
            "is upstream.platform), or files on disk"
        ),
    ]
    state: UpstreamState
    waiting: Annotated[Count, _says("events it still has to take")]
    oldest_age_s: Annotated[
        float | None, _says("how long the oldest of those has waited (null: none waits)")
    ]
    delivered_total: Count
    dead_lettered_total: Count
    dead_letters: Annotated[
        Count, _says("its dead letters now (GET /v1/dead-letters?destination=)")
    ]
    last_error: str | None
    last_error_at: Time | None
    retry_in_s: Annotated[float, msgspec.Meta(ge=0)]
    token_expires_at: Annotated[Time | None, _says("null without OAuth")]
    concurrency_limit: ConcurrencyLimit
    concurrency_ceiling: ConcurrencyCeiling


class ReconcileStatus(Body, kw_only=True, forbid_unknown_fields=True):
    """Proof at the destination ([reconcile]): what this process's checks found."""

    state: Annotated[
        Literal["ok", "unavailable"],
        _says("unavailable: the platform's listing failed; the next round tries again"),
    ]
    after_s: float
    give_up_s: float
    held_total: Annotated[Count, _says("events the platform was found to hold")]
    missing_total: Annotated[Count, _says("events it was found not to hold")]
    resent_total: Annotated[Count, _says("missing events queued to be sent again")]
    given_up_total: Annotated[
        Count, _says("missing for longer than give_up_s: reported (journeys), not resent")
    ]
    last_round_at: Time | None
    last_error: str | None


class Status(Body, kw_only=True, forbid_unknown_fields=True):
    """`GET /v1/status`: the outbox, the upstream, and every destination's delivery."""

    version: str
    accepting: bool
    outbox: OutboxStatus
    upstream: UpstreamStatus
    destinations: Annotated[
        list[DestinationStatus],
        _says("[upstream] first (name upstream), then [[destinations]] in the file's order"),
    ]
    reconcile: Annotated[
        ReconcileStatus | None, _says("null: reconciliation is off (reconcile.after_s = 0)")
    ] = None


class DeadLetterItem(Body, kw_only=True):
    id: str
    destination: Annotated[
        str, _says("where it could not go: upstream, or a [[destinations]] name")
    ]
    reason: str
    status: int | None
    response: str
    attempts: int
    received_at: Time | None
    first_attempt_at: Time | None
    last_attempt_at: Time | None
    dead_lettered_at: Time | None
    event: Annotated[msgspec.Raw, _says("the event as it was received")]


class DeadLetters(Body, kw_only=True):
    """A page of dead letters, oldest first; `next_after` continues it."""

    dead_letters: list[DeadLetterItem]
    next_after: str | None


class Replayed(Body, kw_only=True):
    replayed: Count


class Purged(Body, kw_only=True):
    purged: Count


#: the bodies the OpenAPI document names as components (nested ones join them)
DOCUMENTED: Final[tuple[Any, ...]] = (
    Error,
    Invalid,
    OAuthError,
    Accepted,
    CaliperAccepted,
    Validation,
    Token,
    JobStatus,
    Journey,
    Health,
    Status,
    DeadLetters,
    Replayed,
    Purged,
)


def encode(body: Body) -> bytes:
    return _ENCODER.encode(body)


_ENCODER: Final = msgspec.json.Encoder()
