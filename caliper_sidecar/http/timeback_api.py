"""The rest of TimeBack's API, for apps that use TimeBack's SDK with the sidecar as their
platform: a token endpoint, and job status. And where any one event is: its journey.

An app changes its base URL and its token URL to the sidecar's; its SDK then gets tokens here,
sends to `/caliper/event` (or `/caliper/v1p2`), and asks `GET /jobs/{id}/status` about the job id
it was answered with. A job here is the events of one request: `waiting` while stored, `active`
once sent and not yet confirmed, `completed` when every one reached the platform (and was
confirmed, where the platform confirms), `failed` when any was dead-lettered.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Final, cast
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from caliper_sidecar import codec
from caliper_sidecar.exceptions import AuthFailed, RetryLater
from caliper_sidecar.http import bodies
from caliper_sidecar.http.auth import (
    FAILURE_WINDOW_S,
    ISSUED_TTL_S,
    TOKEN_FAILURES_ALLOWED,
    basic_credentials,
    issue_token,
    matching_token,
)
from caliper_sidecar.http.errors import ApiError, json_response
from caliper_sidecar.http.requests import authenticate, read_body
from caliper_sidecar.http.runtime import RUNTIME, Runtime
from caliper_sidecar.ids import canonical_id
from caliper_sidecar.outbox import Journey
from caliper_sidecar.states import JourneyMark

log = structlog.get_logger("sidecar.drop_in")

Handler = Callable[[web.Request], Awaitable[web.Response]]
#: states in which an event has reached the platform for good
_ARRIVED = frozenset({"delivered", "confirmed"})
#: … or has been sent and is on its way there
_UNDER_WAY = frozenset({"awaiting_confirmation", "unconfirmed"})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/auth/1.0/token", token),
        # Beyond AI's token URL (AWS Cognito) keeps this path: an app that changed only the
        # host of its token URL still gets a token.
        web.post("/oauth2/token", token),
        web.get("/jobs/{job}/status", job_status),
        web.get("/v1/events/{id}", journey),
        web.get("/caliper/events", stored_events),
        # Any id, a raw `/` included: it is answered as the id it is not (400), not as a route
        # that does not exist.
        web.get("/caliper/events/{id:.+}", stored_events),
    ]


async def token(request: web.Request) -> web.Response:
    """OAuth2 client credentials (RFC 6749 §4.4), with the client authenticated by HTTP Basic
    or in the parameters, which come form-encoded (as RFC 6749 says) or as a JSON object (as
    some clients send them); with `receiver.tokens` set, the client secret must be one of
    them. A refusal says which parameter was wrong."""
    rt = request.app[RUNTIME]
    address = request.remote or ""
    wait = rt.token_failures.retry_after(address)
    if wait is not None:
        _refused(rt, address, "slowed_down")
        raise ApiError(
            429,
            "slow_down",
            f"more than {TOKEN_FAILURES_ALLOWED} refused token requests from this address in "
            f"{FAILURE_WINDOW_S:g} s; try again in {wait} s",
            {"Retry-After": str(wait)},
        )
    raw = await read_body(request)
    form = _token_parameters(request.content_type, raw)
    if form is None:
        return _oauth_error(
            400,
            "invalid_request",
            "the parameters must be form-encoded (application/x-www-form-urlencoded) or a JSON "
            "object of strings",
        )
    grant = form.get("grant_type")
    if grant != "client_credentials":
        return _oauth_error(
            400,
            "invalid_request" if grant is None else "unsupported_grant_type",
            "grant_type is missing; it must be client_credentials"
            if grant is None
            else f"grant_type must be client_credentials, not {grant[:40]!r}",
        )
    client_id, secret = basic_credentials(request.headers.get("Authorization", ""))
    if client_id is None:
        client_id = str(form.get("client_id", ""))
        secret = str(form.get("client_secret", ""))
    tokens = rt.settings.receiver.tokens
    matched = matching_token((secret or "").encode("utf-8", "surrogateescape"), tokens)
    if tokens and matched is None:
        rt.token_failures.failed(address)
        _refused(rt, address, "invalid_client")
        return _oauth_error(
            401,
            "invalid_client",
            "the client secret must be one of the sidecar's sender tokens (receiver.tokens)"
            if secret
            else "no client secret: send it with HTTP Basic or as client_secret",
            {"WWW-Authenticate": 'Basic realm="caliper-sidecar"'},
        )
    rt.token_failures.succeeded(address)
    answer = bodies.Token(access_token=issue_token(matched), expires_in=ISSUED_TTL_S)
    if form.get("scope"):
        answer.scope = str(form["scope"])
    return json_response(answer, headers={"Cache-Control": "no-store"})


#: at most one `token_requests_refused` line this often: a brute force must not flood the log
REFUSALS_LOGGED_EVERY_S: Final = 60.0


def _refused(rt: Runtime, address: str, reason: str) -> None:
    """Count a refused token request; log it, at most once a minute, with the count since."""
    rt.metrics.token_requests_refused.labels(reason=reason).inc()
    last, since = rt.token_refusals_logged
    now = time.monotonic()
    if now - last < REFUSALS_LOGGED_EVERY_S:
        rt.token_refusals_logged = (last, since + 1)
        return
    rt.token_refusals_logged = (now, 0)
    log.warning(
        "token_requests_refused", remote=address, reason=reason, refused_since_last_line=since + 1
    )


def _token_parameters(content_type: str, raw: bytes) -> dict[str, str] | None:
    """A token request's parameters, or None when they are neither a form nor JSON strings."""
    if content_type == "application/json":
        try:
            document = codec.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(document, dict) or not all(isinstance(v, str) for v in document.values()):
            return None
        return document
    return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


def _oauth_error(
    status: int,
    error: bodies.OAuthErrorCode,
    description: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = bodies.OAuthError(error=error, error_description=description, message=description)
    return json_response(body, status, headers)


def for_senders(handler: Handler) -> Handler:
    """The route answers only requests that may send events (a sender token, or one this
    sidecar issued); others get the ingest routes' 401."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.Response:
        authenticate(request.app[RUNTIME], request)
        return await handler(request)

    return guarded


@for_senders
async def job_status(request: web.Request) -> web.Response:
    """TimeBack's `GET /jobs/{id}/status`, about a job this sidecar answered an app with."""
    rt = request.app[RUNTIME]
    job = request.match_info["job"]
    ids = await rt.outbox.job_event_ids(job)
    if ids is None:
        raise ApiError(404, "not_found", f"no job {job!r}")
    journeys = await rt.outbox.journeys(ids)
    return json_response(bodies.JobStatus(job=job_document(job, ids, journeys)))


def job_document(job: str, ids: list[str], journeys: dict[str, Journey]) -> bodies.Job:
    """The job in the shape of TimeBack's `JobStatus`. An id the outbox no longer knows was
    delivered longer ago than `outbox.dedupe_window_s` (only delivered events are forgotten)."""
    found = [journeys.get(i) for i in ids]
    dead = [j for j in found if j is not None and j.dead_letter is not None]
    arrived = [j for j in found if j is None or j.state in _ARRIVED]
    results = [
        bodies.JobResult(allocatedId=j.platform_id or j.id, externalId=j.id)
        for j in found
        if j is not None and j.state in _ARRIVED
    ]
    finished = [j.confirmed_at or j.delivered_at for j in found if j is not None]
    processed_on = codec.utc_from_timestamp(max((t for t in finished if t), default=None))
    if dead:
        return bodies.Job(
            id=job,
            state="failed",
            returnValue=bodies.JobReturn(status="error", results=results),
            processedOn=processed_on,
            failedReason="; ".join(
                f"{j.id}: {j.dead_letter.reason} {j.dead_letter.response[:200]}".strip()
                for j in dead
                if j.dead_letter is not None
            ),
        )
    if len(arrived) == len(found):
        return bodies.Job(
            id=job,
            state="completed",
            returnValue=bodies.JobReturn(status="success", results=results),
            processedOn=processed_on,
        )
    if any(j is not None and (j.state in _UNDER_WAY or j.attempts) for j in found):
        return bodies.Job(id=job, state="active")
    return bodies.Job(id=job, state="waiting")


@for_senders
async def journey(request: web.Request) -> web.Response:
    """`GET /v1/events/{id}`: received, attempts, sent, platform job, confirmed or
    dead-lettered and why."""
    rt = request.app[RUNTIME]
    event_id = request.match_info["id"]
    found = (await rt.outbox.journeys([event_id])).get(canonical_id(event_id))
    if found is None:
        raise ApiError(
            404,
            "not_found",
            f"the outbox does not know {event_id!r} (never received, or delivered longer ago "
            "than outbox.dedupe_window_s)",
        )
    return json_response(journey_document(found))


def journey_document(j: Journey) -> bodies.Journey:
    time = codec.utc_from_timestamp
    document = bodies.Journey(
        id=j.id,
        state=j.state,
        received_at=time(j.received_at),
        attempts=j.attempts,
        first_attempt_at=time(j.first_attempt_at),
        last_attempt_at=time(j.last_attempt_at),
        last_error=j.last_error,
        delivered_at=time(j.delivered_at),
        platform_job=j.platform_job,
        platform_id=j.platform_id,
        confirmed_at=time(j.confirmed_at),
        unconfirmed_reason=j.unconfirmed_reason,
        sensor=j.sensor,
        sender=j.sender,
    )
    if j.dead_letter is not None:
        d = j.dead_letter
        document.dead_letter = bodies.DeadLetterOutcome(
            reason=d.reason,
            status=d.status,
            response=d.response,
            dead_lettered_at=time(d.dead_lettered_at),
        )
    if j.destinations:
        document.destinations = {
            name: bodies.DestinationJourney(
                state=cast(bodies.DestinationJourneyState, part.state),
                attempts=part.attempts,
                last_error=part.last_error,
                reason=part.reason,
            )
            for name, part in sorted(j.destinations.items())
        }
    if j.marks:
        document.marks = [
            bodies.Mark(
                at=time(m.at),
                what=JourneyMark(m.what),
                destination=m.destination,
                detail=m.detail,
            )
            for m in j.marks
        ]
    return document


@for_senders
async def stored_events(request: web.Request) -> web.Response:
    """The SDK's `events.list` and `events.get` (`GET /caliper/events[/{id}]`): read through to
    the platform with the sidecar's own token, answered as the platform answers. The events
    stored there are the platform's: the sidecar keeps none of them once delivered."""
    rt = request.app[RUNTIME]
    event_id = request.match_info.get("id")
    if event_id is not None:
        _one_segment(event_id)
    if rt.reader is None:
        raise ApiError(
            404,
            "not_available",
            f"the platform behind this sidecar (upstream.platform "
            f"{rt.settings.upstream.platform!r}, upstream.endpoint) lists no stored events; "
            "Beyond AI's /caliper/event endpoints do",
        )
    try:
        status, text = await rt.reader.get(event_id, request.rel_url.raw_query_string)
    except RetryLater as e:
        raise ApiError(503, "platform_unreachable", str(e), {"Retry-After": "5"}) from None
    except AuthFailed as e:
        raise ApiError(503, "platform_refused_credentials", str(e), {"Retry-After": "30"}) from None
    if status in (401, 403):
        # The sidecar's credentials, not the app's: an app told 401 would drop a good token.
        # Nor is the token delivery holds discarded: a read never costs delivery a token.
        raise ApiError(
            503,
            "platform_refused_credentials",
            f"the platform answered HTTP {status} to the sidecar's own token: {text[:200]}",
            {"Retry-After": "30"},
        )
    try:
        codec.loads(text.encode())
    except (ValueError, RecursionError):
        raise ApiError(
            status if status >= 400 else 502,
            "platform_error",
            f"the platform answered HTTP {status}: {text[:200]}",
        ) from None
    return web.Response(text=text, status=status, content_type="application/json")


def _one_segment(event_id: str) -> None:
    """Refuse an id (as the route decoded it, once) that could name more than one event: `.`,
    `..`, a `/` or a `\\` would make the platform's URL another one (`/caliper/events/..` is
    `/caliper/`, asked with the sidecar's own token)."""
    if event_id in (".", "..") or "/" in event_id or "\\" in event_id:
        raise ApiError(
            400,
            "invalid_event_id",
            "an event id is one path segment: not . or .., and no / or \\ (raw or "
            f"percent-encoded); got {event_id[:100]!r}",
        )
