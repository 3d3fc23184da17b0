"""When to try again: exponential backoff with full jitter, Retry-After, and the circuit that
keeps an outage from turning into a retry storm."""

from __future__ import annotations

import asyncio
import math
import random
import time
from datetime import UTC
from email.utils import parsedate_to_datetime
from enum import StrEnum

from caliper_sidecar.waits import wait_set


def transient_status(status: int) -> bool:
    """Statuses that say "not now" rather than "never": retried with backoff."""
    return status in (408, 425, 429) or status >= 500


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None.

    The value is a peer's: whatever it holds reads as a finite number of seconds or as None,
    never as an exception. Delta-seconds are ASCII digits only (`"²".isdigit()` is True and
    `float("²")` raises; `float("١٢")` is 12).
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        at = when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    now = time.time() if now is None else now
    return max(0.0, at - now)


def backoff_delay(failures: int, initial_s: float, max_s: float) -> float:
    """Full jitter: uniformly between 0 and the capped exponential step for this failure."""
    step = min(max_s, initial_s * 2 ** min(max(failures - 1, 0), 62))
    return random.uniform(0, step)


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Circuit:
    """Backoff for the destination as a whole, not per batch.

    Closed: sends go out at full concurrency. A transient failure opens it for a backoff
    delay; then it half-opens and lets one probe through; the probe's success closes it, its
    failure opens it again for a longer delay. Failures of batches that were already in flight
    when it opened do not lengthen the delay: the outage is counted once.
    """

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.open_until = 0.0
        self._probe_out = False
        self._changed = asyncio.Event()

    def retry_in(self) -> float:
        """Seconds until the next send is allowed (0 when closed)."""
        return max(0.0, self.open_until - time.monotonic()) if self.state == "open" else 0.0

    async def admit(self) -> bool:
        """Wait until a send may start; returns True when that send is the probe."""
        while True:
            if self.state == CircuitState.CLOSED:
                return False
            if self.state == CircuitState.OPEN:
                wait = self.open_until - time.monotonic()
                if wait <= 0:
                    self.state = CircuitState.HALF_OPEN
                    continue
            elif not self._probe_out:
                self._probe_out = True
                return True
            else:
                wait = None
            self._changed.clear()
            await wait_set(self._changed, wait)

    def succeeded(self) -> None:
        self.state = CircuitState.CLOSED
        self.failures = 0
        self._probe_out = False
        self._changed.set()

    def failed(self, retry_after_s: float | None = None, *, probe: bool = False) -> float:
        """Open (or keep open) the circuit; returns the delay chosen."""
        if self.state == CircuitState.CLOSED or probe:
            self.failures += 1
        delay = backoff_delay(self.failures, self.initial_s, self.max_s)
        if retry_after_s is not None:
            # The platform said when; honour it, within the configured cap.
            delay = min(max(delay, retry_after_s), self.max_s)
        self.open_until = max(self.open_until, time.monotonic() + delay)
        self.state = CircuitState.OPEN
        if probe:
            self._probe_out = False
        self._changed.set()
        return delay

    def retune(self, initial_s: float, max_s: float) -> None:
        """New backoff bounds (SIGHUP): the next delay is drawn within them, and a wait longer
        than the new cap is cut to it."""
        self.initial_s, self.max_s = initial_s, max_s
        if self.state == CircuitState.OPEN:
            self.open_until = min(self.open_until, time.monotonic() + max_s)
            self._changed.set()

    def try_now(self) -> None:
        """Let a probe go at once (new credentials after `auth_failed`: no need to wait out
        the capped backoff to learn whether they work)."""
        if self.state == CircuitState.OPEN:
            self.open_until = time.monotonic()
            self._changed.set()

    def probe_abandoned(self) -> None:
        """The probe ended without a verdict (shutdown): let another one go."""
        self._probe_out = False
        self._changed.set()
