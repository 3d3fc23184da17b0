"""Admin routes for dead letters: list, replay, purge. They need `admin.token`, or, when none
is set, a request from this machine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Final

import msgspec
import structlog
from aiohttp import web

from caliper_sidecar import codec
from caliper_sidecar.config import UPSTREAM, is_loopback
from caliper_sidecar.http import bodies
from caliper_sidecar.http.auth import bearer_matches
from caliper_sidecar.http.errors import ApiError, json_response
from caliper_sidecar.http.requests import read_body
from caliper_sidecar.http.runtime import RUNTIME, Runtime
from caliper_sidecar.outbox.records import DeadLetter

log = structlog.get_logger("sidecar.admin")

MAX_LIST: int = 1000


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/tail", tail),
        web.get("/v1/dead-letters", list_dead_letters),
        web.post("/v1/dead-letters/replay", replay),
        web.post("/v1/dead-letters/purge", purge),
    ]


def _authorize(rt: Runtime, request: web.Request) -> str:
    """Who is asking ("admin token" or "loopback"), or an error answer."""
    token = rt.settings.admin.token
    if token:
        if bearer_matches(request, (token,)):
            return "admin token"
        raise ApiError(401, "unauthorized", "a valid admin bearer token is required")
    if not is_loopback(request.remote or ""):
        raise ApiError(
            403,
            "forbidden",
            "admin endpoints answer only on loopback unless admin.token is set",
        )
    return "loopback"


#: seconds without anything happening after which a tail writes an `idle` line (a watcher
#: gone without a word is found out, and proxies keep the stream open)
TAIL_IDLE_S: Final = 15.0


async def tail(request: web.Request) -> web.StreamResponse:
    """`GET /v1/tail`: what happens to events from now on (accepted, sent, confirmed,
    dead-lettered, per destination, with sender labels and ids: never event content), one
    JSON object a line, until the watcher goes (`caliper-sidecar tail`)."""
    rt = request.app[RUNTIME]
    who = _authorize(rt, request)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    log.info("tail_started", who=who)
    with rt.metrics.tap.watching() as watcher:
        await response.write(codec.dumps({"at": round(time.time(), 3), "what": "tailing"}) + b"\n")
        try:
            while True:
                try:
                    line = await asyncio.wait_for(watcher.get(), TAIL_IDLE_S)
                except TimeoutError:
                    line = {"at": round(time.time(), 3), "what": "idle"}
                await response.write(codec.dumps(line) + b"\n")
        except ConnectionError:
            pass  # the watcher went
        finally:
            log.info("tail_ended", who=who)
    return response


def _authorize_change(rt: Runtime, request: web.Request) -> str:
    """An admin POST: authorized, and sent as no web page can send it without asking.

    A page may post `text/plain` to any address without a preflight (`mode: "no-cors"`): it
    cannot read the answer, but a purge would be done. JSON only, then, and never from an
    origin the operator did not list."""
    who = _authorize(rt, request)
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "admin requests take Content-Type: application/json only",
        )
    origin = request.headers.get("Origin")
    own = f"{request.scheme}://{request.host}"  # the status page's own requests
    if origin is not None and origin != own and origin not in rt.settings.receiver.cors_origins:
        log.warning("admin_request_refused", remote=request.remote, origin=origin[:200])
        raise ApiError(
            403,
            "forbidden_origin",
            f"admin requests from the web origin {origin[:100]!r} are refused; list it in "
            "receiver.cors_origins if a page of yours must make them",
        )
    return who


async def list_dead_letters(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    _authorize(rt, request)
    try:
        limit = max(1, min(int(request.query.get("limit", "100")), MAX_LIST))
    except ValueError:
        raise ApiError(400, "bad_request", "limit must be an integer") from None
    items = await rt.outbox.dead_letters(
        limit, request.query.get("after") or None, request.query.get("destination") or None
    )
    return json_response(
        bodies.DeadLetters(
            dead_letters=[dead_letter_document(d) for d in items],
            next_after=items[-1].id if len(items) == limit else None,
        )
    )


def dead_letter_document(d: DeadLetter) -> bodies.DeadLetterItem:
    """A dead letter as JSON: the event itself, and why it died (times in ISO 8601, UTC)."""
    time = codec.utc_from_timestamp
    return bodies.DeadLetterItem(
        id=d.id,
        destination=d.destination,
        reason=d.reason,
        status=d.status,
        response=d.response,
        attempts=d.attempts,
        received_at=time(d.received_at),
        first_attempt_at=time(d.first_attempt_at),
        last_attempt_at=time(d.last_attempt_at),
        dead_lettered_at=time(d.dead_lettered_at),
        # As it was stored (not parsed and written again: big numbers stay exact), on one
        # line: `dead-letters list --json` writes JSON Lines, and SDKs send pretty-printed.
        event=msgspec.Raw(msgspec.json.format(d.body, indent=0)),
    )


async def _selection(request: web.Request) -> tuple[Sequence[str] | None, str | None]:
    """The dead letters a replay or purge is for: the ids (None: all), and the destination
    whose letters they must be (None: any)."""
    raw = await read_body(request)
    try:
        body = codec.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "malformed_json", "the body is not valid JSON") from None
    destination = body.get("destination") if isinstance(body, dict) else None
    if destination is not None and not (isinstance(destination, str) and destination):
        raise ApiError(400, "bad_request", "destination must be a destination's name")
    if isinstance(body, dict) and body.get("all") is True:
        return None, destination
    ids = body.get("ids") if isinstance(body, dict) else None
    if isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids):
        return ids, destination
    raise ApiError(
        400,
        "bad_request",
        'the body must be {"ids": ["..."]} or {"all": true}, with "destination": "<name>" '
        "to take only that destination's dead letters",
    )


async def replay(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    who = _authorize_change(rt, request)
    selection, destination = await _selection(request)
    if destination is not None and destination not in _configured(rt):
        # Its letters would stay where they are (nothing delivers to it): say so, not "0".
        raise ApiError(
            400,
            "unknown_destination",
            f"{destination!r} is not a destination of this configuration (upstream, or a "
            "[[destinations]] name): its dead letters can be listed and purged, not replayed",
        )
    count = await rt.outbox.replay_dead_letters(selection, destination=destination)
    _logged("dead_letters_replayed", request, who, selection, destination, count)
    return json_response(bodies.Replayed(replayed=count))


async def purge(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    who = _authorize_change(rt, request)
    selection, destination = await _selection(request)
    count = await rt.outbox.purge_dead_letters(selection, destination=destination)
    _logged("dead_letters_purged", request, who, selection, destination, count)
    return json_response(bodies.Purged(purged=count))


def _configured(rt: Runtime) -> set[str]:
    return {UPSTREAM, *(d.name for d in rt.settings.destinations)}


def _logged(
    event: str,
    request: web.Request,
    who: str,
    selection: Sequence[str] | None,
    destination: str | None,
    count: int,
) -> None:
    """Say who replayed or purged how many, and whose: a purge destroys events for good."""
    log.warning(
        event,
        who=who,
        remote=request.remote,
        user_agent=request.headers.get("User-Agent", "")[:200],
        selected="all" if selection is None else len(selection),
        destination=destination or "all",
        events=count,
    )
