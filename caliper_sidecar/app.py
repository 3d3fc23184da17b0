"""Wiring: builds every part from the Settings, and owns their lifecycle: one exit stack,
closed in reverse order of opening (`running_sidecar`)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web

from caliper_sidecar.config import UPSTREAM, DestinationSettings, Origins, Settings, is_loopback
from caliper_sidecar.delivery.archive import Archive
from caliper_sidecar.delivery.archive_sender import ARCHIVE_BATCHING, ArchiveSender
from caliper_sidecar.delivery.confirmations import JobFollower
from caliper_sidecar.delivery.dispatcher import Dispatcher
from caliper_sidecar.delivery.reads import PlatformReader, read_session
from caliper_sidecar.delivery.reconciling import ReconcileLoop
from caliper_sidecar.delivery.tokens import token_source
from caliper_sidecar.delivery.upstream import UpstreamClient, delivery_session
from caliper_sidecar.exceptions import CannotListen, OutboxUnavailable
from caliper_sidecar.http import admin, connections, ingest, ops, timeback_api
from caliper_sidecar.http.cors import cross_origin, preflight_routes
from caliper_sidecar.http.errors import errors_as_json
from caliper_sidecar.http.guards import refuse_unknown_hosts
from caliper_sidecar.http.runtime import RUNTIME, Destination, Runtime
from caliper_sidecar.logs import flush_logs
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.outbox import DestinationPlan, Outbox, open_outbox
from caliper_sidecar.preflight import preflight
from caliper_sidecar.presets import events_url
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
    #: [upstream]'s
    dispatcher: Dispatcher
    runner: web.AppRunner
    outbox: Outbox
    url: str
    #: where the operators' routes answer (the receiver's URL unless ops.port is set)
    ops_url: str
    #: the receiver's TLS context (SIGHUP loads a new certificate into it), or None
    tls: ssl.SSLContext | None = None
    #: every destination's dispatcher by name, [upstream]'s as "upstream"
    dispatchers: dict[str, Dispatcher] = field(default_factory=dict)
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

    def push_together(self, parts: list[tuple[str, Callable[[], Awaitable[object]]]]) -> None:
        """Close these at once, not one after the other (each dispatcher's stop waits up to its
        own grace: in turn, several would add theirs up past the stop timeouts we ship); each
        failure is logged under its own name."""

        async def closing() -> None:
            results = await asyncio.gather(*(close() for _, close in parts), return_exceptions=True)
            for (name, _), result in zip(parts, results, strict=True):
                if isinstance(result, Exception):
                    log.error("close_failed", part=name, exc_info=result)
                elif isinstance(result, BaseException):
                    raise result

        self._stack.push_async_callback(closing)


@contextlib.asynccontextmanager
async def running_sidecar(
    settings: Settings, origins: Origins | None = None
) -> AsyncIterator[Sidecar]:
    """Start a sidecar (outbox, a dispatcher per destination, HTTP server) and stop it on
    exit: stop accepting (503), let commits under way finish, give requests to each
    destination a bounded time, then close everything. Whatever is left is delivered after a
    restart.

    Raises SidecarError subclasses at start, with whatever was opened closed again (an open
    outbox would otherwise keep the process alive: aiosqlite's threads are not daemons).
    """
    checked = preflight(settings, origins)
    for warning in checked.warnings:
        log.warning("preflight_warning", warning=warning)
    ssl_context = checked.tls
    async with contextlib.AsyncExitStack() as stack:
        closing = _Closing(stack)
        # A claim outlives the longest send of any destination, with room to spare: a replica
        # killed mid-send gives its events to the others once its lease runs out.
        longest_s = max(
            [settings.upstream.timeout_s, *(d.timeout_s for d in settings.destinations)]
        )
        lease_s = 2 * longest_s + 5
        # Every destination's queue (the empty list too: a destination removed from the
        # configuration has its stored state dropped, so it holds nothing back).
        plans = [
            DestinationPlan(d.name, blocks=d.when_full == "block") for d in settings.destinations
        ]
        outbox = await stack.enter_async_context(
            open_outbox(
                settings.outbox,
                lease_s=lease_s,
                agreement=agreement_of(settings),
                destinations=plans,
                reconciling=settings.reconcile.after_s > 0,
            )
        )
        metrics = Metrics()
        metrics.observe_commits(lambda: outbox.commits)
        session = delivery_session()
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
        reconciling = None
        if reader is not None and settings.reconcile.after_s:
            reconciling = ReconcileLoop(
                outbox, reader, settings.reconcile, upstream.sensor, metrics
            )
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
        destinations = [
            await _destination(closing, outbox, d, settings, metrics) for d in settings.destinations
        ]
        runtime = Runtime(
            settings=settings,
            outbox=outbox,
            metrics=metrics,
            dispatcher=dispatcher,
            tokens=tokens,
            follower=follower,
            reader=reader,
            reconciling=reconciling,
            destinations=tuple(destinations),
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
        for d in destinations:
            d.dispatcher.start()
        if reconciling is not None:
            reconciling.start()
            closing.push("reconcile", reconciling.stop)
        # Stopped together, each given its own timeout_s to finish the sends under way.
        closing.push_together(
            [("dispatcher", lambda: dispatcher.stop(grace_s=settings.upstream.timeout_s))]
            + [
                (f"dispatcher {d.settings.name}", _stopping(d.dispatcher, d.settings.timeout_s))
                for d in destinations
            ]
        )
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
            destinations=[d.name for d in settings.destinations],
            loopback_only=is_loopback(r.host),
        )
        dispatchers = {UPSTREAM: dispatcher} | {d.settings.name: d.dispatcher for d in destinations}
        yield Sidecar(
            runtime, dispatcher, runner, outbox, url, ops_url, ssl_context, dispatchers=dispatchers
        )
    flush_logs()


def agreement_of(settings: Settings) -> dict[str, str]:
    """What replicas sharing a PostgreSQL outbox must agree on (docs/operators.md): where
    [upstream] delivers, the dedupe window, whether they reconcile, and the destinations
    (names, kinds, where each delivers): one that started with fewer would drop the others'
    place in the queue."""
    destinations = sorted(settings.destinations, key=lambda d: d.name)
    return {
        "upstream.platform": settings.upstream.platform,
        "upstream.endpoint": settings.upstream.endpoint,
        "outbox.dedupe_window_s": repr(float(settings.outbox.dedupe_window_s)),
        # a replica that does not reconcile would let go of what the others keep to check
        "reconcile": "on" if settings.reconcile.after_s else "off",
        "destinations": "; ".join(
            f"{d.name} {d.kind} {d.endpoint if d.kind == 'caliper' else d.dir}"
            for d in destinations
        )
        or "none",
    }


async def _destination(
    closing: _Closing,
    outbox: Outbox,
    settings: DestinationSettings,
    sidecar: Settings,
    metrics: Metrics,
) -> Destination:
    """One of [[destinations]]: its sender (a caliper endpoint's client, with connections of
    its own, or the archive's files, opened and repaired now) and its dispatcher over its own
    queue, closed with the rest. Raises ArchiveUnusable for an archive dir it cannot use."""
    if settings.kind == "archive":
        sender = await ArchiveSender(Archive(Path(settings.dir), settings.keep_days)).open()
        closing.push(f"archive {settings.name}", sender.close)
        dispatcher = Dispatcher(
            outbox.queue(settings.name),
            sender,
            name=settings.name,
            batching=ARCHIVE_BATCHING,
            retry=sidecar.retry,
            metrics=metrics,
        )
        return Destination(settings, dispatcher)
    session = delivery_session()
    closing.push(f"{settings.name} session", session.close)
    client = UpstreamClient.for_destination(session, settings, metrics)
    dispatcher = Dispatcher(
        outbox.queue(settings.name),
        client,
        name=settings.name,
        batching=settings,
        retry=sidecar.retry,
        metrics=metrics,
    )
    return Destination(settings, dispatcher, client.tokens)


def _stopping(dispatcher: Dispatcher, grace_s: float) -> Callable[[], Awaitable[int]]:
    """Stopping this dispatcher (a lambda written in the loop would stop the last one only)."""
    return lambda: dispatcher.stop(grace_s=grace_s)


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
    """The last words before the outbox closes: what is still waiting, for [upstream] and for
    each of [[destinations]] (named only when there are some)."""
    try:
        waiting: int | None = (await rt.outbox.stats()).events
    except OutboxUnavailable:
        waiting = None  # the count is for the log line; closing matters more
    cut = rt.dispatcher.sends_cut if rt.dispatcher is not None else None
    destinations: dict[str, dict[str, int | None]] = {}
    for d in rt.destinations:
        try:
            theirs: int | None = (await rt.outbox.destination_stats(d.settings.name)).waiting
        except OutboxUnavailable:
            theirs = None
        destinations[d.settings.name] = {"waiting": theirs, "sends_cut": d.dispatcher.sends_cut}
    if destinations:
        log.info("stopped", waiting=waiting, sends_cut=cut, destinations=destinations)
    else:
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
