"""What every route reads from a request: who sends it (a sender token, or one this sidecar
issued) and its body, within the body deadline and the size limit."""

from __future__ import annotations

from aiohttp import web

from caliper_sidecar.http import connections
from caliper_sidecar.http.auth import sender_label, sending_token
from caliper_sidecar.http.errors import ApiError
from caliper_sidecar.http.runtime import RUNTIME, Runtime


def authenticate(rt: Runtime, request: web.Request) -> str:
    """The label of the sender (its token's, "" without one); ApiError (401) unless the
    request may send events (docs/app-developers.md: a sender token, or a token this sidecar
    issued)."""
    tokens = rt.settings.receiver.tokens
    if not tokens:
        return ""
    token = sending_token(request, tokens)
    if token is not None:
        return sender_label(token)
    raise ApiError(
        401,
        "unauthorized",
        "a valid `Authorization: Bearer <token>` is required",
        headers={"WWW-Authenticate": 'Bearer realm="caliper-sidecar"'},
    )


async def read_body(request: web.Request) -> bytes:
    """A request's body, whichever route reads it: within the body deadline and the size
    limit, or ApiError (408, 413, 400)."""
    try:
        return await connections.read_body(request)
    except TimeoutError:
        raise ApiError(
            408,
            "request_timeout",
            f"the body did not arrive within {connections.BODY_DEADLINE_S:g} s of its headers",
            headers={"Connection": "close"},
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(request.app[RUNTIME].settings.receiver.max_body_bytes) from None
    except Exception as e:  # a broken gzip stream, a truncated chunked body
        raise ApiError(400, "unreadable_body", f"the body could not be read: {e}") from None


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, "body_too_large", f"the body is larger than {limit} bytes (receiver.max_body_bytes)"
    )
