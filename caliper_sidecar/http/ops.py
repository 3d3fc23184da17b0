"""What operators look at: liveness, readiness, Prometheus metrics and a JSON status."""

from __future__ import annotations

from importlib import resources
from typing import Final

from aiohttp import web

from caliper_sidecar import __version__, codec
from caliper_sidecar.config import UPSTREAM, is_loopback
from caliper_sidecar.http import bodies, openapi
from caliper_sidecar.http.auth import bearer_matches
from caliper_sidecar.http.errors import ApiError, json_response
from caliper_sidecar.http.runtime import RUNTIME, Runtime
from caliper_sidecar.metrics import DestinationSnapshot, Snapshot
from caliper_sidecar.states import UpstreamState

#: the status page: plain HTML and a little JavaScript, no build step, nothing fetched from
#: elsewhere (a classroom box may be offline); it holds no data, and asks /v1/status and
#: /v1/dead-letters with the admin token a person types in (from another machine)
STATUS_PAGE: Final = (resources.files(__package__) / "status_page.html").read_bytes()
OPENAPI: Final = openapi.rendered()
_PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    # frame-ancestors: no other page may frame it (clickjacking "Delete all"); X-Frame-Options
    # says the same to browsers older than CSP 2.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}


def routes() -> list[web.RouteDef]:
    return [
        web.get("/", status_page),
        web.get("/openapi.json", openapi_document),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        web.get("/v1/status", status),
    ]


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI, content_type="application/json")


async def status_page(request: web.Request) -> web.Response:
    return web.Response(body=STATUS_PAGE, content_type="text/html", headers=_PAGE_HEADERS)


async def healthz(request: web.Request) -> web.Response:
    return json_response(bodies.Health(status="alive"))


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    reason = await not_ready_reason(rt)
    if reason is None:
        return json_response(bodies.Health(status="ready"))
    return json_response(bodies.Health(status="not_ready", reason=reason), status=503)


async def not_ready_reason(rt: Runtime) -> str | None:
    """Why the sidecar should not be sent events now, or None when it should: the HTTP side's
    own word (shutting down), then each part's ping."""
    if not rt.accepting:
        return "shutting_down"
    return await rt.outbox.ping()


def operators_only(rt: Runtime, request: web.Request) -> None:
    """What the state of the sidecar is (metrics, status) is for this machine, or for whoever
    presents the admin token: on a relay's LAN-facing listener it is not for every sender.
    Health and readiness stay open, for probes."""
    if is_loopback(request.remote or ""):
        return
    token = rt.settings.admin.token
    if token and bearer_matches(request, (token,)):
        return
    raise ApiError(
        401,
        "unauthorized",
        "from another machine this route needs the admin token (admin.token), or the ops "
        "listener (ops.port) on loopback",
        headers={"WWW-Authenticate": 'Bearer realm="caliper-sidecar operators"'},
    )


#: set on the ops listener's application (ops.port): what it serves is for operators only
OPS_LISTENER: Final = web.AppKey("ops_listener", bool)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics: on a separate ops listener for whoever scrapes it (Prometheus in a
    pod scrapes from another address, and carries no token); on the receiver's listener, for
    this machine or the admin token only."""
    rt = request.app[RUNTIME]
    if not request.app.get(OPS_LISTENER, False):
        operators_only(rt, request)
    stats = await rt.outbox.stats()
    limits = rt.settings.outbox
    rt.metrics.state.snapshot = Snapshot(
        events=stats.events,
        bytes=stats.bytes,
        oldest_age_s=stats.oldest_age_s or 0.0,
        dead_letters=stats.dead_letters,
        platform_jobs=tuple(stats.platform_jobs.items()),
        upstream_state=rt.dispatcher.state.value if rt.dispatcher is not None else "ok",
        token_expires_at=rt.tokens.expires_at if rt.tokens is not None else None,
        capacity_events=limits.max_events,
        capacity_bytes=limits.max_bytes,
        destinations=tuple(
            [
                DestinationSnapshot(
                    d.settings.name,
                    d.dispatcher.state.value,
                    d.tokens.expires_at if d.tokens is not None else None,
                    backlog.waiting,
                    backlog.oldest_age_s or 0.0,
                )
                for d in rt.destinations
                for backlog in [await rt.outbox.destination_stats(d.settings.name)]
            ]
        ),
    )
    body, content_type = rt.metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def status(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    operators_only(rt, request)
    return json_response(await status_document(rt))


async def status_document(rt: Runtime) -> bodies.Status:
    stats = await rt.outbox.stats()
    dispatcher = rt.dispatcher
    expires_at = rt.tokens.expires_at if rt.tokens is not None else None
    upstream = bodies.UpstreamStatus(
        platform=rt.settings.upstream.platform,
        endpoint=rt.settings.upstream.endpoint,
        state=dispatcher.state if dispatcher is not None else UpstreamState.OK,
        last_error=dispatcher.last_error if dispatcher is not None else None,
        last_error_at=codec.utc_from_timestamp(
            dispatcher.last_error_at if dispatcher is not None else None
        ),
        retry_in_s=dispatcher.retry_in_s if dispatcher is not None else 0.0,
        in_flight=dispatcher.in_flight if dispatcher is not None else 0,
        token_expires_at=codec.utc_from_timestamp(expires_at),
        concurrency_limit=dispatcher.concurrency.limit if dispatcher is not None else 0,
        concurrency_ceiling=(
            dispatcher.concurrency.ceiling
            if dispatcher is not None
            else rt.settings.upstream.concurrency
        ),
    )
    if rt.settings.upstream.jobs_url:
        # Processing confirmation: jobs followed now, and those given up on (never finished).
        upstream.platform_jobs = bodies.PlatformJobsStatus(
            following=rt.follower.following if rt.follower is not None else 0,
            unconfirmed=stats.platform_jobs.get("unconfirmed", 0),
        )
    destinations = [
        bodies.DestinationStatus(
            name=UPSTREAM,
            kind="caliper",
            state=upstream.state,
            waiting=stats.events,
            oldest_age_s=stats.oldest_age_s,
            delivered_total=stats.delivered_total,
            dead_lettered_total=stats.dead_lettered_total,
            dead_letters=stats.dead_letters,
            last_error=upstream.last_error,
            last_error_at=upstream.last_error_at,
            retry_in_s=upstream.retry_in_s,
            token_expires_at=upstream.token_expires_at,
            concurrency_limit=upstream.concurrency_limit,
            concurrency_ceiling=upstream.concurrency_ceiling,
        )
    ]
    for d in rt.destinations:
        theirs = await rt.outbox.destination_stats(d.settings.name)
        expiry = d.tokens.expires_at if d.tokens is not None else None
        destinations.append(
            bodies.DestinationStatus(
                name=d.settings.name,
                kind=d.settings.kind,
                state=d.dispatcher.state,
                waiting=theirs.waiting,
                oldest_age_s=theirs.oldest_age_s,
                delivered_total=theirs.delivered_total,
                dead_lettered_total=theirs.dead_lettered_total,
                dead_letters=theirs.dead_letters,
                last_error=d.dispatcher.last_error,
                last_error_at=codec.utc_from_timestamp(d.dispatcher.last_error_at),
                retry_in_s=d.dispatcher.retry_in_s,
                token_expires_at=codec.utc_from_timestamp(expiry),
                concurrency_limit=d.dispatcher.concurrency.limit,
                concurrency_ceiling=d.dispatcher.concurrency.ceiling,
            )
        )
    reconcile = None
    if rt.reconciling is not None:
        totals, settings = rt.reconciling.totals, rt.settings.reconcile
        reconcile = bodies.ReconcileStatus(
            state=totals.state,
            after_s=settings.after_s,
            give_up_s=settings.give_up_s,
            held_total=totals.held,
            missing_total=totals.missing,
            resent_total=totals.resent,
            given_up_total=totals.given_up,
            last_round_at=codec.utc_from_timestamp(totals.last_round_at),
            last_error=totals.last_error,
        )
    return bodies.Status(
        version=__version__,
        accepting=rt.accepting,
        outbox=bodies.OutboxStatus(
            events=stats.events,
            bytes=stats.bytes,
            oldest_age_s=stats.oldest_age_s,
            dead_letters=stats.dead_letters,
            delivered_total=stats.delivered_total,
            dead_lettered_total=stats.dead_lettered_total,
        ),
        upstream=upstream,
        destinations=destinations,
        reconcile=reconcile,
    )
