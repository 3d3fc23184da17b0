"""A TLS listener that answers plain HTTP: `400` in plain HTTP, saying to use `https://`.

A classroom device configured with `http://` for a relay that speaks TLS would otherwise get
an empty reply (its TLS handshake never starts: curl's exit 52), which tells its developer
nothing. So the listener does not hand a new connection to TLS at once: it looks at the first
byte the peer sends without taking it (MSG_PEEK). A TLS ClientHello begins with 0x16 (a
handshake record): the connection is then upgraded (`loop.start_tls`) and served as any TLS
one. Anything else is taken for plain HTTP: its request head is read, a `400` with the one
JSON error shape is written, and the connection is closed once the peer has had the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from typing import Final

from caliper_sidecar import codec

#: the first byte of a TLS record carrying a handshake (a ClientHello)
TLS_HANDSHAKE: Final = 0x16
#: how long a new connection may take to send its first byte, or its TLS handshake
FIRST_BYTES_S: Final = 15.0
#: the most of a plain request's head read before it is answered anyway
HEAD_LIMIT: Final = 8192
#: how long the rest of a plain request is read (and dropped) after the answer, so that the
#: peer reads the answer rather than a reset
LINGER_S: Final = 1.0


class TlsOrPlain(asyncio.Protocol):
    """A new connection on a TLS listener until its first byte says which it is (see the
    module); `protocol` is what serves it once it speaks TLS."""

    def __init__(self, protocol: asyncio.Protocol, context: ssl.SSLContext, port: int) -> None:
        self._protocol = protocol
        self._context = context
        self._port = port
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._fd = -1
        self._deadline: asyncio.TimerHandle | None = None
        self._upgrading: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.pause_reading()
        # A descriptor of our own on the same socket: asyncio watches none that a transport
        # owns, and its socket object does not read.
        self._fd = os.dup(transport.get_extra_info("socket").fileno())
        self._loop.add_reader(self._fd, self._peek)
        self._deadline = self._loop.call_later(FIRST_BYTES_S, transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()

    def _stop_watching(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _peek(self) -> None:
        assert self._transport is not None
        try:
            with socket.socket(fileno=os.dup(self._fd)) as peer:
                first = peer.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return  # not yet: the reader fires again
        except OSError:
            first = b""
        self._stop_watching()
        if not first:
            self._transport.abort()
        elif first[0] == TLS_HANDSHAKE:
            self._upgrading = asyncio.create_task(self._upgrade(), name="tls-upgrade")
        else:
            if self._deadline is not None:
                self._deadline.cancel()
            self._transport.set_protocol(PlainRefusal(self._port))
            self._transport.get_protocol().connection_made(self._transport)
            self._transport.resume_reading()

    async def _upgrade(self) -> None:
        transport = self._transport
        assert transport is not None
        try:
            tls = await self._loop.start_tls(
                transport,
                self._protocol,
                self._context,
                server_side=True,
                ssl_handshake_timeout=FIRST_BYTES_S,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            transport.abort()
            return
        finally:
            if self._deadline is not None:
                self._deadline.cancel()
        if tls is None:
            transport.abort()
            return
        self._protocol.connection_made(tls)


class PlainRefusal(asyncio.Protocol):
    """Plain HTTP on the TLS listener: read the head, answer 400 saying to use https://."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._head = b""
        self._transport: asyncio.Transport | None = None
        self._answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        asyncio.get_running_loop().call_later(FIRST_BYTES_S, self._answer)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # the rest of the request, dropped
        self._head += data
        if b"\r\n\r\n" in self._head or len(self._head) >= HEAD_LIMIT:
            self._answer()

    def _answer(self) -> None:
        if self._answered or self._transport is None or self._transport.is_closing():
            return
        self._answered = True
        host = _host_of(self._head) or f"this-host:{self._port}"
        body = codec.dumps(
            {
                "error": "https_required",
                "message": f"this port speaks TLS: send to https://{host}/ (not http://)",
            }
        )
        self._transport.write(
            b"HTTP/1.1 400 Bad Request\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        with contextlib.suppress(OSError, RuntimeError):
            self._transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self._transport.close)


def _host_of(head: bytes) -> str | None:
    """The request's Host header, when it is a plain host[:port]."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip().decode("ascii", errors="replace")
            if host and all(c.isalnum() or c in ".-:[]" for c in host):
                return host
    return None
