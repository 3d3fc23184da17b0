"""The real `caliper-sidecar run` process: end to end, SIGKILL, SIGTERM, one run per outbox."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.mock_upstream import RunningFake

from .conftest import SidecarProcess, free_port, make_events, write_config


def launch(
    tmp_path: Path,
    platform: RunningFake,
    processes: list[SidecarProcess],
    name: str = "a",
    outbox: Path | None = None,
    **extra: Any,
) -> SidecarProcess:
    port = free_port()
    config = write_config(
        tmp_path / f"{name}.toml", platform, outbox or tmp_path / "outbox.db", port, **extra
    )
    process = SidecarProcess(config, port, tmp_path / f"{name}.log")
    processes.append(process)
    return process


async def post(url: str, events: list[dict[str, object]]) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/events", json=events) as resp,
    ):
        await resp.read()
        return resp.status


class TestRun:
    async def test_end_to_end(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """Events posted to the real process reach the fake TimeBack through OAuth."""
        p = launch(tmp_path, platform, processes)
        await p.wait_ready()
        events = make_events(25)
        assert await post(p.url, events) == 202
        await platform.fake.wait_for({e["id"] for e in events}, timeout=20)
        assert platform.fake.token_requests == 1
        assert await p.terminate() == 0
        logs = p.logs()
        assert "batch_delivered" in p.events()
        assert platform.fake.client_secret not in logs

    @pytest.mark.parametrize("synchronous", ["full", "normal"])
    async def test_sigkill_after_202_loses_nothing(
        self,
        tmp_path: Path,
        platform: RunningFake,
        processes: list[SidecarProcess],
        synchronous: str,
    ) -> None:
        """An event acknowledged with 202 survives SIGKILL right after, and is delivered
        after the restart."""
        platform.fake.outage(3600)  # nothing leaves before the kill
        p = launch(tmp_path, platform, processes, outbox__synchronous=synchronous)
        await p.wait_ready()
        acknowledged: set[str] = set()
        for _ in range(10):
            events = make_events(5)
            assert await post(p.url, events) == 202
            acknowledged |= {e["id"] for e in events}
        p.kill()
        platform.fake.faults.outage_until = 0
        again = launch(tmp_path, platform, processes, name="b")
        await again.wait_ready()
        await platform.fake.wait_for(acknowledged, timeout=20)
        assert await again.terminate() == 0

    async def test_second_run_on_the_same_outbox_refuses(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        first = launch(tmp_path, platform, processes)
        await first.wait_ready()
        second = launch(tmp_path, platform, processes, name="b")
        assert await second.wait_exit() == 1
        assert "in use by caliper-sidecar run" in second.logs()
        assert await first.terminate() == 0

    async def test_sigterm_exits_zero_and_keeps_the_rest(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """SIGTERM during an outage: exit 0 within the bound; the events wait on disk."""
        platform.fake.outage(3600)
        p = launch(tmp_path, platform, processes, upstream__timeout_s=1)
        await p.wait_ready()
        events = make_events(5)
        assert await post(p.url, events) == 202
        assert await p.terminate(timeout=15) == 0
        assert "stopped" in p.events()
        platform.fake.faults.outage_until = 0
        again = launch(tmp_path, platform, processes, name="b")
        await again.wait_ready()
        await platform.fake.wait_for({e["id"] for e in events}, timeout=20)
        assert await again.terminate() == 0

    async def test_refuses_non_loopback_without_tokens(self, tmp_path: Path) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "run",
            env={
                "SIDECAR_RECEIVER_HOST": "0.0.0.0",
                "SIDECAR_UPSTREAM_ENDPOINT": "http://127.0.0.1:9/e",
                "PATH": "/usr/bin",
            },
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        assert proc.returncode == 2
        assert b"receiver.tokens" in err
