"""One error path for every route, as Starlette's exception middleware has it: a route raises
`ApiError` (or lets an `OutboxUnavailable` or one of aiohttp's HTTP exceptions rise), and
`errors_as_json` answers it in the one error shape, `{"error", "message"}`, through the one
JSON encoder (`json_response`). Storage failures are told to apps as a reason and a request id
under which the log holds what actually failed (a database's column names, its address: not for
apps)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web

from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.http import bodies
from caliper_sidecar.validation.reading import TooManyEvents
from caliper_sidecar.validation.shape import ShapeError

log = structlog.get_logger("sidecar.errors")

#: headers of an error's plain-text body, replaced with the JSON body's own
_BODY_HEADERS: Final = frozenset({"content-type", "content-length"})


class ApiError(Exception):
    """An answer with an error: its status, a machine-readable word, a message for people,
    headers (Retry-After, WWW-Authenticate), and the body when it says more than those two
    (the findings of invalid events)."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: dict[str, str] | None = None,
        body: bodies.Body | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.body = body if body is not None else bodies.Error(error=error, message=message)
        self.headers: dict[str, str] = headers or {}


def json_response(
    body: bodies.Body, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """Every JSON answer of every route, errors or not."""
    return web.Response(
        body=bodies.encode(body), status=status, headers=headers, content_type="application/json"
    )


def unavailable(error: OutboxUnavailable, path: str) -> ApiError:
    """An unusable outbox (full, a full disk, shutting down, a storage error) as a 503 with
    Retry-After; a failure with a detail is logged with the request id the body carries."""
    body = bodies.Error(error=error.reason, message=str(error))
    if error.detail is not None:
        body.request_id = uuid.uuid4().hex[:16]
        log.error("storage_error", request_id=body.request_id, path=path, detail=error.detail)
    retry = {"Retry-After": str(error.retry_after_s)}
    return ApiError(503, body.error, body.message, retry, body)


def unreadable(error: ShapeError | TooManyEvents) -> ApiError:
    """A body the door cannot read (validation/reading.py) as its answer: too many events is a
    413, anything else (not JSON, not a shape events come in) a 400 named by its code."""
    if isinstance(error, TooManyEvents):
        return ApiError(413, "too_many_events", str(error))
    return ApiError(400, error.code, str(error))


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error of every route is JSON in one shape (an unknown route's 404 and a wrong
    method's 405 included), so an SDK reports the real error rather than "invalid JSON". Any
    route that meets an unusable outbox answers 503 with Retry-After, as ingest does, rather
    than a 500."""
    try:
        return await handler(request)
    except ApiError as e:
        return json_response(e.body, e.status, e.headers)
    except OutboxUnavailable as e:
        refused = unavailable(e, request.path)
        return json_response(refused.body, refused.status, refused.headers)
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        headers = {k: v for k, v in e.headers.items() if k.lower() not in _BODY_HEADERS}
        message = e.text if e.text and e.text != f"{e.status}: {e.reason}" else e.reason
        error = e.reason.lower().replace(" ", "_").replace("-", "_")
        return json_response(bodies.Error(error=error, message=message), e.status, headers)
