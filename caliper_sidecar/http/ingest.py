"""The ingest routes: authenticate, parse, validate, append, and answer only after the commit.

`/v1/events` answers in the sidecar's own terms; `/caliper/event` and `/caliper/v1p2` answer as
TimeBack's Caliper API does (`{"status", "jobId", "eventsAccepted"}`), so that apps using
TimeBack's SDK (or any Caliper sensor) can point at the sidecar instead of the platform.
`/caliper/event/validate` checks without storing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from caliper_sidecar.envelope import MAX_SENSOR_BYTES, sensor_bytes
from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.http import bodies
from caliper_sidecar.http.errors import ApiError, json_response, unavailable, unreadable
from caliper_sidecar.http.requests import authenticate, read_body, too_large
from caliper_sidecar.http.runtime import RUNTIME, Runtime
from caliper_sidecar.ids import canonical_id
from caliper_sidecar.logs import HotLine
from caliper_sidecar.outbox import AppendResult, NewEvent
from caliper_sidecar.validation import Report
from caliper_sidecar.validation.reading import Limits, Received, TooManyEvents, read_events
from caliper_sidecar.validation.shape import ShapeError

log = HotLine("sidecar.receiver")

JSON_TYPES: Final = frozenset({"application/json", "application/ld+json"})
#: JSON Lines, as log shippers send it (Fluent Bit's json_lines, Vector's ndjson)
LINES_TYPES: Final = frozenset({"application/x-ndjson", "application/jsonl"})
#: what aiohttp decodes for us; anything else would be read as if it were plain JSON
ENCODINGS: Final = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


def routes() -> list[web.RouteDef]:
    caliper = _ingest_route(_answer_caliper, with_job=True)
    return [
        web.post("/v1/events", _ingest_route(_answer_v1)),
        web.post("/caliper/event", caliper),
        web.post("/caliper/v1p2", caliper),
        web.post("/caliper/event/validate", validate_only),
    ]


def _answer_v1(accepted: Accepted) -> web.Response:
    body = bodies.Accepted(
        accepted=accepted.result.accepted,
        duplicates=accepted.result.duplicates,
        ids=accepted.ids,
    )
    if accepted.report.warnings:
        body.warnings = accepted.report.warnings
        body.warnings_total = accepted.report.warning_count
    return json_response(body, 202)


def _answer_caliper(accepted: Accepted) -> web.Response:
    assert accepted.job is not None  # this route is built with_job
    body = bodies.CaliperAccepted(jobId=accepted.job, eventsAccepted=accepted.result.accepted)
    return json_response(body, 200)


def _ingest_route(
    answer: Callable[[Accepted], web.Response], with_job: bool = False
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        rt = request.app[RUNTIME]
        started = time.monotonic()
        fields: dict[str, Any] = {}
        status: int | None = None  # None: neither answered nor refused (cancelled, a bug)
        try:
            job = str(uuid.uuid4()) if with_job else None
            response = answer(await _ingest(rt, request, fields, job))
            status = response.status
            return response
        except ApiError as e:  # counted and logged here, answered by errors_as_json
            rt.metrics.events_rejected.labels(reason=e.error).inc(fields.get("events", 1))
            fields["error"] = e.error
            status = e.status
            raise
        finally:
            if status is not None:
                log.info(
                    "ingest",
                    path=request.path,
                    status=status,
                    remote=request.remote,
                    duration_ms=round((time.monotonic() - started) * 1000, 2),
                    **fields,
                )

    return handle


@dataclass(frozen=True, slots=True)
class Accepted:
    """What a successful ingest answers with."""

    ids: list[str]
    result: AppendResult
    report: Report
    job: str | None


async def _ingest(
    rt: Runtime, request: web.Request, fields: dict[str, Any], job: str | None
) -> Accepted:
    if not rt.accepting:
        raise unavailable(
            OutboxUnavailable("shutting_down", "the sidecar is shutting down"), request.path
        )
    sender = fields["sender"] = authenticate(rt, request)
    limit = rt.settings.receiver.max_body_bytes
    # Memory held from reading the body until its events are committed is bounded (see
    # connections.ByteBudget); a body of unknown length counts as the largest allowed.
    size = min(request.content_length or limit, limit)
    await rt.body_budget.take(size)
    try:
        return await _ingest_body(rt, request, fields, job, sender)
    finally:
        await rt.body_budget.give_back(size)


async def _ingest_body(
    rt: Runtime, request: web.Request, fields: dict[str, Any], job: str | None, sender: str
) -> Accepted:
    received = await _read_events(rt, request)
    report = received.report
    fields["events"] = len(received.ids)
    if report.warnings:
        fields["warnings"] = [f"{f.index}{f.path}: {f.rule}" for f in report.warnings[:20]]
    if not report.ok:
        message = f"{report.error_count} problem(s) found; nothing of this request was stored"
        invalid = bodies.Invalid(
            message=message, errors=report.errors, errors_total=report.error_count
        )
        raise ApiError(422, invalid.error, message, body=invalid)
    batch = []
    raw, sensor = received.bodies()
    if sensor is not None and sensor_bytes(sensor) > MAX_SENSOR_BYTES:
        raise ApiError(
            400,
            "malformed_envelope",
            f"the envelope's sensor is longer than {MAX_SENSOR_BYTES} bytes",
        )
    for index, (event_id, body) in enumerate(zip(received.ids, raw, strict=True)):
        if len(body) > rt.max_event_bytes:
            raise ApiError(
                413,
                "event_too_large",
                f"event {index} is {len(body)} bytes; an envelope holds at most "
                f"{rt.max_event_bytes} bytes of events (upstream.batch_max_bytes)",
            )
        batch.append(NewEvent(canonical_id(event_id), body, sensor, sender or None))
    rt.commits_in_progress += 1
    try:
        result = await rt.outbox.append(batch, job)
    except OutboxUnavailable as e:
        raise unavailable(e, request.path) from e
    finally:
        rt.commits_in_progress -= 1
    rt.metrics.received(sender, result.accepted, result.duplicates)
    rt.metrics.tap.publish(
        "accepted",
        received.ids,
        sender=sender or None,
        duplicates=result.duplicates or None,
        job=job,
    )
    fields.update(accepted=result.accepted, duplicates=result.duplicates, job=job)
    return Accepted(received.ids, result, report, job)


async def validate_only(request: web.Request) -> web.Response:
    """`POST /caliper/event/validate`: TimeBack's validation answer; nothing is stored."""
    rt = request.app[RUNTIME]
    authenticate(rt, request)
    report = (await _read_events(rt, request)).report
    body = bodies.Validation(status="success" if report.ok else "error")
    if not report.ok:
        body.errors, body.errors_total = report.errors, report.error_count
    if report.warnings:
        body.warnings, body.warnings_total = report.warnings, report.warning_count
    return json_response(body, 200)


async def _read_events(rt: Runtime, request: web.Request) -> Received:
    """The events of the request's body, validated; ApiError when the body is not of a type
    and encoding events come in, not JSON, not a shape events come in, or holds too many."""
    if request.content_type not in JSON_TYPES | LINES_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            "Content-Type must be application/json or application/ld+json (or, one event a "
            f"line, application/x-ndjson or application/jsonl), not "
            f"{request.content_type or 'missing'}",
        )
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ENCODINGS:
        raise ApiError(
            415,
            "unsupported_content_encoding",
            f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or none",
        )
    limit = rt.settings.receiver.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    raw = await read_body(request)
    validation = rt.settings.validation
    limits = Limits(
        rt.settings.receiver.max_events_per_request, validation.mode, validation.profile
    )
    try:
        return read_events(raw, limits, rt.decoder, request.content_type in LINES_TYPES)
    except (ShapeError, TooManyEvents) as e:
        raise unreadable(e) from None
