"""A wall-clock step (NTP, a laptop waking up) never stops delivery (SPEC §6)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from .conftest import (
    StartSidecar,
    make_event,
)


class TestClockSteps:
    """#3: a wall-clock step (NTP, a laptop waking up) never stops delivery."""

    async def test_backward_step_does_not_stop_delivery(
        self, custom: StartSidecar, fake: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Events stored, then the clock steps back an hour: they are still delivered (the
        linger wait used to compare the stepped clock with the stored receive time)."""
        _, client = await custom(upstream={"linger_ms": 200})
        fake.outage(0.5)
        events = [make_event() for _ in range(5)]
        async with client.post("/v1/events", json=events) as resp:
            assert resp.status == 202
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 3600)
        await fake.wait_for({e["id"] for e in events}, timeout=10)

    async def test_forward_step_does_not_resend_or_drop(
        self, custom: StartSidecar, fake: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, client = await custom()
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 86_400 * 3)
        events = [make_event() for _ in range(5)]
        async with client.post("/v1/events", json=events) as resp:
            assert resp.status == 202
        await fake.wait_for({e["id"] for e in events}, timeout=10)
        assert fake.duplicates == 0
