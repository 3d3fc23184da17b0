"""`caliper-sidecar tail [-c FILE] [--json]`: what happens to events in a running sidecar, as it
happens (its `GET /v1/tail`), a line each: accepted, sent, confirmed, dead-lettered, per
destination, with sender labels and ids, never event content (docs/operators.md).

It finds the sidecar the configuration describes: the ops listener when `ops.port` is set,
else the receiver (over TLS when it has a certificate, which is then the one trusted), and
sends `admin.token` when there is one.
"""

from __future__ import annotations

import ssl
import sys
import time
from typing import Any, TextIO

import aiohttp

from caliper_sidecar import codec
from caliper_sidecar.config import Settings

#: how `tail` names a listener that listens on every address
_ANY: frozenset[str] = frozenset({"0.0.0.0", "::", ""})


def tail_url(settings: Settings) -> tuple[str, ssl.SSLContext | None]:
    """Where the running sidecar's `/v1/tail` is, and the TLS context to reach it."""
    if settings.ops.port:
        host, port, tls = settings.ops.host, settings.ops.port, None
    else:
        r = settings.receiver
        host, port = r.host, r.port
        tls = _trusting(r.tls_cert) if r.tls_cert else None
    host = "127.0.0.1" if host in _ANY else host
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{host}:{port}/v1/tail", tls


def _trusting(cert: str) -> ssl.SSLContext:
    """TLS that trusts the receiver's own certificate (self-signed on a classroom relay), as
    well as the system's authorities; the name is not checked (this is the same machine)."""
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=cert)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


def render(line: dict[str, Any]) -> str:
    """A line for people: time, what, where, how many, who, which."""
    at = time.strftime("%H:%M:%S", time.localtime(float(line.get("at", 0))))
    parts = [at, f"{line.get('what', '?'):<13}"]
    if "destination" in line:
        parts.append(f"to {line['destination']}")
    if "events" in line:
        parts.append(f"{line['events']} event{'s' if line['events'] != 1 else ''}")
    for key in ("sender", "duplicates", "reason", "status", "state", "job", "lines"):
        if key in line:
            parts.append(f"{key}={line[key]}")
    ids = line.get("ids") or []
    if ids:
        more = line.get("events", len(ids)) - len(ids)
        parts.append(" ".join(ids) + (f" (+{more})" if more > 0 else ""))
    return "  ".join(parts)


async def tail(settings: Settings, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Follow the running sidecar's tail until interrupted; the exit status."""
    url, tls = tail_url(settings)
    headers = {"Authorization": f"Bearer {settings.admin.token}"} if settings.admin.token else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(url, headers=headers, ssl=tls if tls is not None else True) as resp,
        ):
            if resp.status != 200:
                text = (await resp.text())[:300]
                print(f"caliper-sidecar: {url} answered {resp.status}: {text}", file=sys.stderr)
                return 1
            async for raw in resp.content:
                if not raw.strip():
                    continue
                line = codec.loads(raw)
                if line.get("what") == "idle":
                    continue
                print(raw.decode().rstrip() if as_json else render(line), file=out, flush=True)
    except aiohttp.ClientError as e:
        print(f"caliper-sidecar: cannot follow {url}: {e} (is `run` running?)", file=sys.stderr)
        return 1
    return 0
