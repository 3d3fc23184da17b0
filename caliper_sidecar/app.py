"""Wiring: builds every part from the Settings, and owns their lifecycle: one exit stack,
closed in reverse order of opening (`running_sidecar`)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import structlog
from aiohttp import web

from caliper_sidecar.config import UPSTREAM, Origins, Settings, is_loopback
from caliper_sidecar.delivery.confirmations import JobFollower
from caliper_sidecar.delivery.dispatcher import Dispatcher
from caliper_sidecar.delivery.reads import PlatformReader, events_url, read_session
from caliper_sidecar.delivery.tokens import token_source
from caliper_sidecar.delivery.upstream import UpstreamClient, delivery_session
from caliper_sidecar.exceptions import CannotListen, OutboxUnavailable
from caliper_sidecar.http import admin, connections, ingest, ops, timeback_api
from caliper_sidecar.http.cors import cross_origin, preflight_routes
from caliper_sidecar.http.errors import errors_as_json
from caliper_sidecar.http.guards import refuse_unknown_hosts
from caliper_sidecar.http.runtime import RUNTIME, Runtime
from caliper_sidecar.logs import flush_logs
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.outbox import Outbox, open_outbox
from caliper_sidecar.preflight import preflight, require_no_destinations
from caliper_sidecar.reload import reload
from caliper_sidecar.signals import StopSignals

log = structlog.get_logger("sidecar")

INGEST_DRAIN_S: Final = 10.0  # how long shutdown waits for the commits under way
#: how long aiohttp then waits for requests still running (a client trickling its body): they
#: were never acknowledged, so cutting them loses nothing, and the whole stop stays well
#: within the shipped stop timeouts (systemd TimeoutStopSec, Kubernetes' grace period: 60 s)
HANDLERS_GRACE_S: Final = 2.0


@dataclass
class Sidecar:
    """A running sidecar: its parts and the address it listens on."""

    runtime: Runtime
    dispatcher: Dispatcher
    runner: web.AppRunner
    outbox: Outbox
    url: str
    #: where the operators' routes answer (the receiver's URL unless ops.port is set)
    ops_url: str
    #: the receiver's TLS context (SIGHUP loads a new certificate into it), or None
    tls: ssl.SSLContext | None = None
    _lifecycle: contextlib.AbstractAsyncContextManager[Sidecar] | None = None

    async def stop(self) -> None:
        """Leave the lifecycle `start` entered: everything closes, in reverse order."""
        if self._lifecycle is not None:
            lifecycle, self._lifecycle = self._lifecycle, None
            await lifecycle.__aexit__(None, None, None)


async def start(settings: Settings) -> Sidecar:
    """Enter `running_sidecar(settings)` and return the sidecar; `Sidecar.stop` leaves it
    (for callers that cannot hold an `async with`: the demo, tests)."""
    lifecycle = running_sidecar(settings)
    sidecar = await lifecycle.__aenter__()
    sidecar._lifecycle = lifecycle
    return sidecar


class _Closing:
    """One owner for everything a sidecar opens: closed in reverse order of opening, each
    close shielded from the failure of another (a failed close is logged, the rest still
    close; svcs closes its registry the same way)."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack

    def push(self, name: str, close: Callable[[], Awaitable[object]]) -> None:
        async def closing() -> None:
            try:
                await close()
            except Exception:
                log.exception("close_failed", part=name)

        self._stack.push_async_callback(closing)


@contextlib.asynccontextmanager
async def running_sidecar(
    settings: Settings, origins: Origins | None = None
) -> AsyncIterator[Sidecar]:
    """Start a sidecar (outbox, dispatcher, HTTP server) and stop it on exit: stop accepting
    (503), let commits under way finish, give requests upstream a bounded time, then close
    everything. Whatever is left is delivered after a restart.

    Raises SidecarError subclasses at start, with whatever was opened closed again (an open
    outbox would otherwise keep the process alive: aiosqlite's threads are not daemons).
    """
    checked = preflight(settings, origins)
    require_no_destinations(settings)
    for warning in checked.warnings:
        log.warning("preflight_warning", warning=warning)
    ssl_context = checked.tls
    async with contextlib.AsyncExitStack() as stack:
        closing = _Closing(stack)
        # A claim outlives the longest send, with room to spare: a replica killed mid-send
        # gives its events to the others once its lease runs out.
        lease_s = 2 * settings.upstream.timeout_s + 5
        # What replicas sharing a PostgreSQL outbox must agree on (docs/operators.md).
        agreement = {
            "upstream.platform": settings.upstream.platform,
            "upstream.endpoint": settings.upstream.endpoint,
            "outbox.dedupe_window_s": repr(float(settings.outbox.dedupe_window_s)),
        }
        outbox = await stack.enter_async_context(
            open_outbox(settings.outbox, lease_s=lease_s, agreement=agreement)
        )
        metrics = Metrics()
        metrics.observe_commits(lambda: outbox.commits)
        session = delivery_session(settings.upstream.concurrency)
        closing.push("upstream session", session.close)
        counted = metrics.for_destination(UPSTREAM)
        tokens = token_source(
            session,
            settings.oauth,
            settings.upstream.bearer_token,
            settings.upstream.timeout_s,
            counted,
        )
        upstream = UpstreamClient(session, settings.upstream, tokens, counted)
        reader: PlatformReader | None = None
        listing = events_url(settings.upstream.endpoint)
        if listing is not None:
            # Apps' reads get connections of their own: never the ones delivery waits for.
            reads = read_session()
            closing.push("platform reads session", reads.close)
            reader = PlatformReader(reads, listing, settings.upstream.timeout_s, tokens, metrics)
        follower = JobFollower(outbox, upstream, metrics) if upstream.follows_jobs else None
        dispatcher = Dispatcher(
            outbox,
            upstream,
            name=UPSTREAM,
            batching=settings.upstream,
            retry=settings.retry,
            metrics=metrics,
            on_platform_job=follower.track if follower else None,
        )
        runtime = Runtime(
            settings=settings,
            outbox=outbox,
            metrics=metrics,
            dispatcher=dispatcher,
            tokens=tokens,
            follower=follower,
            reader=reader,
            max_event_bytes=settings.upstream.batch_max_bytes - upstream.overhead,
        )
        closing.push("stopped log line", lambda: _log_stopped(runtime))
        r, o = settings.receiver, settings.ops
        routes = ingest.routes() + timeback_api.routes() + preflight_routes()
        operator_routes = ops.routes() + admin.routes()
        if o.port:
            # A listener of their own: /healthz stays on the receiver too, for the app.
            routes.append(web.get("/healthz", ops.healthz))
        else:
            routes += operator_routes
        runner = await _serve(closing, runtime, routes, r.host, r.port, ssl_context, "receiver")
        ops_runner = (
            await _serve(closing, runtime, operator_routes, o.host, o.port, None, "ops")
            if o.port
            else runner
        )
        if follower is not None:
            await follower.start()
            closing.push("job follower", follower.stop)
        dispatcher.start()
        closing.push("dispatcher", lambda: dispatcher.stop(grace_s=settings.upstream.timeout_s))
        closing.push("ingest", lambda: _drain_ingest(runtime))
        url = _url(runner, "https" if r.tls_cert else "http")
        ops_url = _url(ops_runner, "http") if o.port else url
        log.info(
            "started",
            url=url,
            ops_url=ops_url,
            outbox="postgresql" if settings.outbox.url else settings.outbox.path,
            upstream=settings.upstream.endpoint,
            platform=settings.upstream.platform,
            loopback_only=is_loopback(r.host),
        )
        yield Sidecar(runtime, dispatcher, runner, outbox, url, ops_url, ssl_context)
    flush_logs()


async def _serve(
    closing: _Closing,
    runtime: Runtime,
    routes: list[web.RouteDef],
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    name: str,
) -> web.AppRunner:
    """An HTTP listener for these routes, closed with the rest; raises CannotListen."""
    app = web.Application(
        client_max_size=runtime.settings.receiver.max_body_bytes,
        middlewares=[cross_origin, errors_as_json, refuse_unknown_hosts],
    )
    app[RUNTIME] = runtime
    app[ops.OPS_LISTENER] = name == "ops"
    app.add_routes(routes)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=HANDLERS_GRACE_S,
        keepalive_timeout=connections.HEADERS_DEADLINE_S,
        lingering_time=connections.LINGER_S,
    )
    await runner.setup()
    closing.push(f"{name} http server", runner.cleanup)
    key = "ops" if name == "ops" else "receiver"
    try:
        connections.raise_fd_limit()
        await connections.BoundedTCPSite(runner, host, port, ssl_context=ssl_context).start()
    except OSError as e:
        raise CannotListen(
            f"cannot listen on {host}:{port}: {e.strerror or e} ({key}.host, {key}.port)"
        ) from None
    return runner


def _url(runner: web.AppRunner, scheme: str) -> str:
    host, port = runner.addresses[0][:2]
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


async def _drain_ingest(rt: Runtime) -> None:
    """The first step of stopping: 503 to new events, and the commits under way finish."""
    rt.accepting = False
    deadline = time.monotonic() + INGEST_DRAIN_S
    while rt.commits_in_progress and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def _log_stopped(rt: Runtime) -> None:
    """The last words before the outbox closes: what is still waiting."""
    try:
        waiting: int | None = (await rt.outbox.stats()).events
    except OutboxUnavailable:
        waiting = None  # the count is for the log line; closing matters more
    cut = rt.dispatcher.sends_cut if rt.dispatcher is not None else None
    log.info("stopped", waiting=waiting, sends_cut=cut)


async def serve(
    settings: Settings,
    origins: Origins | None = None,
    load: Callable[[], Settings] | None = None,
) -> None:
    """`caliper-sidecar run`: serve until SIGTERM or SIGINT, then shut down gracefully; at
    SIGHUP, reload what may change (`load` reads the configuration again)."""
    with StopSignals() as signals:
        async with contextlib.AsyncExitStack() as stack:
            # A stop during start-up (a lock held, a slow database) ends it at once: what was
            # opened is closed again, nothing was acknowledged yet.
            starting = asyncio.ensure_future(
                stack.enter_async_context(running_sidecar(settings, origins))
            )
            stopped = asyncio.ensure_future(signals.stop.wait())
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not starting.done():
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                log.info("stopping", reason="signal during start-up")
                return
            sidecar = starting.result()
            if load is not None:
                signals.on_hangup = lambda: reload(sidecar.runtime, sidecar.tls, load)
            await signals.stop.wait()
            log.info("stopping", reason="signal")
