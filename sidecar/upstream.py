"""The HTTP call to the Caliper endpoint, and what its answer means.

`UpstreamClient.send` returns on any 2xx and otherwise raises the outcome the dispatcher acts
on: RetryLater (transient), Refused (this batch will never be accepted), AuthFailed.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Final

import aiohttp

from .backoff import parse_retry_after, transient_status
from .config import UpstreamSettings
from .envelope import build_envelope, envelope_overhead
from .exceptions import AuthFailed, Refused, RetryLater
from .metrics import Metrics
from .tokens import TokenSource

RESPONSE_KEPT: Final = 1024  # bytes of a refusal kept with the dead letter


def default_sensor() -> str:
    """The envelope's `sensor` when none is configured: stable for this host."""
    return f"urn:caliper-sidecar:{socket.gethostname()}"


class UpstreamClient:
    """Posts envelopes to the Caliper endpoint with a bearer token."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: UpstreamSettings,
        tokens: TokenSource,
        metrics: Metrics,
    ) -> None:
        self._session = session
        self._endpoint = settings.endpoint
        self.sensor = settings.sensor or default_sensor()
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._tokens = tokens
        self._metrics = metrics
        #: bytes the envelope adds around its events, for the batch size limit
        self.overhead = envelope_overhead(self.sensor)

    async def send(self, bodies: Sequence[bytes]) -> int:
        """Send one envelope of these serialized events; returns the 2xx status."""
        envelope = build_envelope(self.sensor, bodies)
        token = await self._tokens.bearer()
        status, retry_after, text = await self._post(envelope, token)
        if status == 401 and token is not None:
            # The token may have been revoked or expired early: one fresh token, one retry.
            self._tokens.invalidate(token)
            fresh = await self._tokens.bearer()
            if fresh is not None and fresh != token:
                status, retry_after, text = await self._post(envelope, fresh)
        if 200 <= status < 300:
            return status
        if status in (401, 403):
            raise AuthFailed(f"Caliper endpoint answered HTTP {status}: {text[:200]}")
        if transient_status(status):
            raise RetryLater(f"Caliper endpoint answered HTTP {status}", retry_after)
        if 400 <= status < 500:
            raise Refused(status, text[:RESPONSE_KEPT])
        # 1xx/3xx: a misconfigured endpoint or proxy, not a verdict on these events.
        raise RetryLater(f"Caliper endpoint answered unexpected HTTP {status}")

    async def _post(self, envelope: bytes, token: str | None) -> tuple[int, float | None, str]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        started = time.monotonic()
        try:
            async with self._session.post(
                self._endpoint,
                data=envelope,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                text = await resp.text(errors="replace")
                code = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except TimeoutError as e:
            self._metrics.upstream_requests.labels(code="timeout").inc()
            raise RetryLater("Caliper endpoint timed out") from e
        except aiohttp.ClientError as e:
            self._metrics.upstream_requests.labels(code="error").inc()
            raise RetryLater(f"Caliper endpoint unreachable: {type(e).__name__}: {e}") from e
        finally:
            self._metrics.upstream_seconds.observe(time.monotonic() - started)
        self._metrics.upstream_requests.labels(code=str(code)).inc()
        return code, retry_after, text
