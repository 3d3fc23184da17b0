"""The lifecycle (app.py): one owner for everything a sidecar opens."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from caliper_sidecar.app import running_sidecar, start
from caliper_sidecar.exceptions import CannotListen, OutboxUnavailable
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import free_port, settings_for


class TestLifecycle:
    async def test_closing_failures_are_logged_but_ignored(
        self, platform: RunningFake, tmp_path: Path
    ) -> None:
        """A part that fails to close is logged; every other part still closes: the server
        stops listening and the outbox is closed (its lock released)."""
        sidecar = await start(settings_for(platform, tmp_path))

        async def broken(grace_s: float) -> int:
            raise RuntimeError("the dispatcher would not stop")

        sidecar.dispatcher.stop = broken  # type: ignore[method-assign]
        with capture_logs() as logs:
            await sidecar.stop()
        failed = [e for e in logs if e["event"] == "close_failed"]
        assert [e["part"] for e in failed] == ["dispatcher"]
        assert "stopped" in [e["event"] for e in logs]
        with pytest.raises(OutboxUnavailable):
            await sidecar.outbox.append([])
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(f"{sidecar.url}/healthz")
        again = await start(settings_for(platform, tmp_path))  # the file lock was released
        await again.stop()

    async def test_a_failed_start_closes_what_it_opened(
        self, platform: RunningFake, tmp_path: Path
    ) -> None:
        """A start that fails half-way (the port is taken) leaves nothing open behind it."""
        port = free_port()
        first = await start(settings_for(platform, tmp_path / "a", receiver={"port": port}))
        try:
            with pytest.raises(CannotListen):
                async with running_sidecar(
                    settings_for(platform, tmp_path / "b", receiver={"port": port})
                ):
                    pass
            # Its outbox was closed and unlocked: another sidecar can have it now.
            second = await start(settings_for(platform, tmp_path / "b"))
            await second.stop()
        finally:
            await first.stop()
