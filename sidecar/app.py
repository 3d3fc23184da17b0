"""Wiring: builds every part from the Settings, starts them, and stops them in order."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
import structlog
from aiohttp import web

from . import admin, connections, drop_in, ops, receiver
from .config import Settings, is_loopback, require_upstream
from .confirmations import JobFollower
from .dispatcher import Dispatcher
from .exceptions import CannotListen, ConfigError, OutboxUnavailable
from .logs import flush_logs
from .metrics import Metrics
from .outbox import OutboxLock, SqliteOutbox
from .runtime import RUNTIME, Runtime
from .signals import until_stop_signal
from .tokens import OAuthTokens, StaticToken, TokenSource
from .upstream import UpstreamClient

log = structlog.get_logger("sidecar")

INGEST_DRAIN_S: Final = 10.0  # how long shutdown waits for the commits under way
#: how long aiohttp then waits for requests still running (a client trickling its body): they
#: were never acknowledged, so cutting them loses nothing, and the whole stop stays well
#: within the shipped stop timeouts (systemd TimeoutStopSec, Kubernetes' grace period: 60 s)
HANDLERS_GRACE_S: Final = 2.0


@dataclass
class Sidecar:
    """A started sidecar: its parts and the address it listens on."""

    runtime: Runtime
    dispatcher: Dispatcher
    runner: web.AppRunner
    session: aiohttp.ClientSession
    outbox: SqliteOutbox
    lock: OutboxLock
    url: str

    async def stop(self) -> None:
        """Stop accepting (503), let commits under way finish, give requests upstream a
        bounded time, then close everything. Whatever is left is delivered after a restart."""
        started = time.monotonic()
        rt = self.runtime
        rt.accepting = False
        deadline = time.monotonic() + INGEST_DRAIN_S
        while rt.commits_in_progress and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        cut = await self.dispatcher.stop(grace_s=rt.settings.upstream.timeout_s)
        if rt.follower is not None:
            await rt.follower.stop()
        await self.runner.cleanup()
        try:
            waiting: int | None = (await self.outbox.stats()).events
        except OutboxUnavailable:
            waiting = None  # the count is for the log line; closing matters more
        await self.outbox.close()
        await self.session.close()
        self.lock.release()
        log.info(
            "stopped",
            waiting=waiting,
            sends_cut=cut,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        flush_logs()


async def start(settings: Settings) -> Sidecar:
    """Start a sidecar: outbox, dispatcher and HTTP server. Raises SidecarError subclasses;
    whatever was opened before a failure is closed again (an open outbox would otherwise keep
    the process alive: aiosqlite's threads are not daemons)."""
    require_upstream(settings)
    ssl_context = _tls(settings)
    opened = contextlib.AsyncExitStack()
    try:
        lock = OutboxLock(settings.outbox.path)
        lock.acquire()
        opened.callback(lock.release)
        outbox = await SqliteOutbox(
            settings.outbox.path,
            synchronous=settings.outbox.synchronous,
            max_events=settings.outbox.max_events,
            max_bytes=settings.outbox.max_bytes,
            dedupe_window_s=settings.outbox.dedupe_window_s,
        ).open()
        opened.push_async_callback(outbox.close)
        metrics = Metrics()
        metrics.observe_commits(lambda: outbox.commits)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.upstream.concurrency + 2),
            headers={"User-Agent": "caliper-sidecar"},
        )
        opened.push_async_callback(session.close)
        tokens: TokenSource = (
            OAuthTokens(session, settings.oauth, settings.upstream.timeout_s, metrics)
            if settings.oauth.token_url
            else StaticToken(settings.upstream.bearer_token)
        )
        upstream = UpstreamClient(session, settings.upstream, tokens, metrics)
        follower = JobFollower(outbox, upstream, metrics) if upstream.follows_jobs else None
        dispatcher = Dispatcher(
            outbox, upstream, settings, metrics, follower.track if follower else None
        )
        runtime = Runtime(
            settings=settings,
            outbox=outbox,
            metrics=metrics,
            dispatcher=dispatcher,
            tokens=tokens,
            follower=follower,
            max_event_bytes=settings.upstream.batch_max_bytes - upstream.overhead,
        )
        app = web.Application(
            client_max_size=settings.receiver.max_body_bytes, middlewares=[_unavailable_as_503]
        )
        app[RUNTIME] = runtime
        app.add_routes(receiver.routes() + drop_in.routes() + ops.routes() + admin.routes())
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=HANDLERS_GRACE_S,
            keepalive_timeout=connections.HEADERS_DEADLINE_S,
            lingering_time=connections.LINGER_S,
        )
        await runner.setup()
        opened.push_async_callback(runner.cleanup)
        r = settings.receiver
        try:
            connections.raise_fd_limit()
            await connections.BoundedTCPSite(
                runner, r.host, r.port, ssl_context=ssl_context
            ).start()
        except OSError as e:
            raise CannotListen(
                f"cannot listen on {r.host}:{r.port}: {e.strerror or e} "
                "(receiver.host, receiver.port)"
            ) from None
        if follower is not None:
            await follower.start()
            opened.push_async_callback(follower.stop)
    except BaseException:
        await opened.aclose()
        raise
    opened.pop_all()  # from here on, Sidecar.stop closes everything, in order
    host, port = runner.addresses[0][:2]
    scheme = "https" if r.tls_cert else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
    dispatcher.start()
    log.info(
        "started",
        url=url,
        outbox=settings.outbox.path,
        upstream=settings.upstream.endpoint,
        loopback_only=is_loopback(r.host),
    )
    return Sidecar(runtime, dispatcher, runner, session, outbox, lock, url)


@web.middleware
async def _unavailable_as_503(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Any route that meets an unusable outbox (a full disk, shutting down) answers 503 with
    Retry-After, as ingest does, rather than a 500."""
    try:
        return await handler(request)
    except OutboxUnavailable as e:
        return web.json_response(
            {"error": e.reason, "message": str(e)},
            status=503,
            headers={"Retry-After": str(e.retry_after_s)},
        )


def _tls(settings: Settings) -> ssl.SSLContext | None:
    r = settings.receiver
    if not r.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(r.tls_cert, r.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"receiver.tls_cert / receiver.tls_key cannot be loaded: {e}") from None
    return context


async def serve(settings: Settings) -> None:
    """`caliper-sidecar run`: serve until SIGTERM or SIGINT, then shut down gracefully."""
    sidecar = await start(settings)
    try:
        await until_stop_signal()
        log.info("stopping", reason="signal")
    finally:
        await sidecar.stop()
