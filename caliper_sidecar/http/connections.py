"""The receiver's connections, against hostile or broken peers: deadlines, and a bound.

- A connection that is idle, or still sending its headers, `HEADERS_DEADLINE_S` after it opened
  (or after its last answer) is closed: aiohttp's keep-alive timer, armed at connection start.
- A body must arrive within `BODY_DEADLINE_S` of its headers (`read_body`), else 408: no
  request holds a connection for more than their sum without completing.
- At most `max_connections()` connections are open at once, safely below the process's file
  descriptor limit: a new one beyond it takes the place of the oldest connection that has no
  request under way, or is closed at once when every one is busy. Either way the process never
  runs out of descriptors (which had left `/healthz` unanswered and filled the log with
  "accept() out of system resource" tracebacks).
"""

from __future__ import annotations

import asyncio
import resource
import ssl
from typing import Any, Final

import structlog
from aiohttp import web

from caliper_sidecar.http.plain_to_tls import TlsOrPlain

log = structlog.get_logger("sidecar.connections")

HEADERS_DEADLINE_S: Final = 15.0
BODY_DEADLINE_S: Final = 15.0
#: how long the rest of an unread body is read (so that the client sees the answer) before the
#: connection is closed anyway; aiohttp's default, 10 s, is a gift to a trickling peer
LINGER_S: Final = 1.0
MAX_CONNECTIONS: Final = 1000
#: bodies held at once, in units of receiver.max_body_bytes
BODIES_IN_FLIGHT: Final = 4
#: connections asyncio may accept in one pass of the loop, before the bound is consulted
BACKLOG: Final = 128
#: descriptors kept below the limit: one pass of accepts, connections closing (their
#: descriptors are freed a pass later), and what is not a connection (outbox, upstream, logs)
RESERVED_FDS: Final = 2 * BACKLOG + 64


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (systemd's default soft limit is
    1024); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, min(MAX_CONNECTIONS, soft - RESERVED_FDS))


class ByteBudget:
    """How many bytes of request bodies may be held at once, from reading them until their
    events are committed; a request waits for room before it reads. Small requests hardly
    wait; a crowd of maximum-size ones is taken a budget's worth at a time (24 concurrent 1 MiB
    bodies full of warnings had reached 447 MB)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._waiting = 0
        self._room = asyncio.Condition()

    async def take(self, size: int) -> None:
        """Wait for room for `size` bytes (at most the total) and hold them; give_back frees
        them. When there is room and nobody waits, this takes no lock: nothing runs between
        the check and the taking on one event loop, and a request on the hot path spares the
        lock's two round trips (bench/ingest.py)."""
        size = min(size, self.total)
        if not self._waiting and self._free >= size:
            self._free -= size
            return
        self._waiting += 1
        try:
            async with self._room:
                await self._room.wait_for(lambda: self._free >= size)
                self._free -= size
        finally:
            self._waiting -= 1

    async def give_back(self, size: int) -> None:
        self._free += min(size, self.total)
        if self._waiting:
            async with self._room:
                self._room.notify_all()


async def read_body(request: web.Request) -> bytes:
    """The whole body, or TimeoutError when it has not arrived within BODY_DEADLINE_S."""
    if request.content.is_eof():
        # Already here whole (most small bodies come with their headers): no deadline to
        # arm and cancel, which cost a timer per request.
        return await request.read()
    async with asyncio.timeout(BODY_DEADLINE_S):
        return await request.read()


class _Refused(asyncio.Protocol):
    """What a connection over the bound meets: closed at once, descriptor given back."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _BoundedFactory:
    """aiohttp's protocol factory, with at most `limit` connections open; on a TLS listener
    (`tls`), each first tells TLS from plain HTTP (plain_to_tls.py)."""

    def __init__(self, server: web.Server, limit: int, tls: ssl.SSLContext | None) -> None:
        self._server = server
        self._limit = limit
        self._limited = False
        self._tls = tls
        #: the port listened on (for the plain HTTP answer, where the request names no Host)
        self.port = 0

    def __call__(self) -> asyncio.Protocol:
        protocol = self._bounded()
        if self._tls is None or isinstance(protocol, _Refused):
            return protocol
        return TlsOrPlain(protocol, self._tls, self.port)

    def _bounded(self) -> asyncio.Protocol:
        handlers = self._server.connections
        if len(handlers) < self._limit:
            if self._limited and len(handlers) < self._limit // 2:
                self._limited = False
                log.info("connections_below_limit", open=len(handlers), limit=self._limit)
            protocol: asyncio.Protocol = self._server()
            return protocol
        if not self._limited:
            # Once per episode: a flood of connections is one line, not one per connection.
            self._limited = True
            log.warning("connections_limited", open=len(handlers), limit=self._limit)
        for handler in handlers:  # oldest first
            transport = handler.transport
            idle = not getattr(handler, "_request_in_progress", True)
            if idle and transport is not None and not transport.is_closing():
                transport.abort()
                new: asyncio.Protocol = self._server()
                return new
        return _Refused()


class BoundedTCPSite(web.BaseSite):
    """A TCP site like aiohttp's, whose connections are bounded (see the module)."""

    __slots__ = ("_host", "_limit", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: Any = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=BACKLOG)
        self._host, self._port = host, port
        self._limit = limit or max_connections()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        factory = _BoundedFactory(server, self._limit, self._ssl_context)
        # TLS is not asyncio's here: the factory starts it per connection, once the first
        # byte says the peer speaks it (plain HTTP gets a 400 saying to use https://).
        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        factory.port = int(self._server.sockets[0].getsockname()[1])
