"""What keeps web pages out: a request that carries no token the sidecar knows must name the
sidecar by a name it answers to, so a page on a DNS name rebound to 127.0.0.1 reads nothing.

Routes that answer without a token on loopback (the operators' and admin routes, journeys, job
status, the status page; ingest and TimeBack's API while `receiver.tokens` is empty) would
otherwise answer any page whose name resolves to this machine: the browser sends that name as
`Host`, which an IP literal, `localhost` or a `receiver.server_names` entry never is for such
a page. A request that authenticates with a sender or admin token is not asked: it is not a
browser's ambient request, and apps reach gateways by names nobody listed.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from caliper_sidecar.http.auth import bearer_matches, presented_token, sender_allowed
from caliper_sidecar.http.errors import ApiError
from caliper_sidecar.http.runtime import RUNTIME

#: probes ask by whatever name their platform uses; they read nothing worth rebinding for
UNGUARDED: Final = frozenset({"/healthz", "/readyz"})


def host_name(host: str) -> str:
    """The name part of a Host header: without its port, an IPv6 literal without brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


# Remembered: every request asks, nearly always with the same Host, and parsing it as an IP
# address was 3 % of the event loop's time under single-event ingest (bench/profile_ingest.py).
# Bounded, so a client inventing Host values costs only the parsing it would have cost anyway.
@functools.lru_cache(maxsize=256)
def known_host(host: str, server_names: tuple[str, ...]) -> bool:
    """An IP literal, `localhost`, or one of the names the operator listed."""
    name = host_name(host).rstrip(".")
    if name == "localhost" or name in (n.lower().rstrip(".") for n in server_names):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@web.middleware
async def refuse_unknown_hosts(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """421 for a request without a known token that names this sidecar by an unknown Host."""
    settings = request.app[RUNTIME].settings
    if (
        request.path in UNGUARDED
        or request.method == "OPTIONS"  # a preflight reads nothing, and carries no token
        or known_host(request.host, settings.receiver.server_names)
    ):
        return await handler(request)
    if presented_token(request) is not None:
        tokens = settings.receiver.tokens
        admin = settings.admin.token
        if (tokens and sender_allowed(request, tokens)) or (
            admin and bearer_matches(request, (admin,))
        ):
            return await handler(request)
    raise ApiError(
        421,
        "misdirected_request",
        f"Host {request.host[:100]!r} is not a name this sidecar answers to without a token: "
        "reach it by an IP address or localhost, or list the name in receiver.server_names",
    )
