"""Browsers: web apps on the origins listed in `receiver.cors_origins` may send events.

The ingest routes and TimeBack's drop-in routes answer a listed origin's preflight (`OPTIONS` →
204 with the CORS headers, `Access-Control-Allow-Private-Network: true` included, which Chrome's
Private Network Access asks of a relay on the LAN) and carry `Access-Control-Allow-Origin` on
their answers to it. A request from any other origin (it carries `Origin`) is refused with 403
and stores nothing. Every other route answers no cross-origin request: it never sends CORS
headers, and has no preflight.

A middleware of our own rather than aiohttp-cors: that library registers CORS per route on the
router, knows nothing of Private Network Access, and would answer the preflight of an unlisted
origin with a bare 403 of its own; here the refusal is our JSON error and the policy is eleven
lines.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from caliper_sidecar.http import bodies
from caliper_sidecar.http.errors import json_response
from caliper_sidecar.http.runtime import RUNTIME

#: the routes browsers may reach: ingest and TimeBack's API for apps
CROSS_ORIGIN_PATHS: Final = frozenset(
    {
        "/v1/events",
        "/caliper/event",
        "/caliper/v1p2",
        "/caliper/event/validate",
        "/auth/1.0/token",
        "/oauth2/token",
        "/jobs/{job}/status",
        "/v1/events/{id}",
        "/caliper/events",
        "/caliper/events/{id}",
    }
)
MAX_AGE_S: Final = 600


def preflight_routes() -> list[web.RouteDef]:
    """An `OPTIONS` route beside each route a browser may reach."""
    return [web.options(path, preflight) for path in sorted(CROSS_ORIGIN_PATHS)]


async def preflight(request: web.Request) -> web.Response:
    """A listed origin's preflight (the middleware refused any other before this)."""
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding",
            "Access-Control-Max-Age": str(MAX_AGE_S),
            "Access-Control-Allow-Private-Network": "true",
        },
    )


def _cross_origin_route(request: web.Request) -> bool:
    route = request.match_info.route
    return route.resource is not None and route.resource.canonical in CROSS_ORIGIN_PATHS


@web.middleware
async def cross_origin(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin is None or not _cross_origin_route(request):
        return await handler(request)
    if origin not in request.app[RUNTIME].settings.receiver.cors_origins:
        # Answered here, not raised: this middleware runs outside the one that answers errors.
        refused = bodies.Error(
            error="forbidden_origin",
            message=f"the web origin {origin[:100]!r} may not send here; list it in "
            "receiver.cors_origins",
        )
        return json_response(refused, status=403)
    response = await handler(request)
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    response.headers.add("Vary", "Origin")
    return response
