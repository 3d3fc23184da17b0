"""Crash and shutdown safety of the real process (docs/guarantees.md), and two-hop chaining
(docs/guarantees.md)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp

from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SidecarProcess, eventually, free_port, make_events, write_config


def launch(
    tmp_path: Path,
    platform: RunningFake,
    processes: list[SidecarProcess],
    name: str,
    **extra: Any,
) -> SidecarProcess:
    port = free_port()
    config = write_config(
        tmp_path / f"{name}.toml", platform, tmp_path / "outbox.db", port, **extra
    )
    process = SidecarProcess(config, port, tmp_path / f"{name}.log")
    processes.append(process)
    return process


async def post(url: str, events: list[dict[str, object]], token: str = "") -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/events", json=events, headers=headers) as resp,
    ):
        await resp.read()
        return resp.status


async def outbox_stats(config: Path) -> dict[str, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "caliper_sidecar",
        "outbox",
        "stats",
        "--json",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    stats: dict[str, int] = json.loads(out)
    return stats


class TestSigkill:
    async def test_during_heavy_concurrent_ingest(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """SIGKILL while 16 clients post and batches are delivered: after a restart, every
        acknowledged id reaches the platform."""
        p = launch(tmp_path, platform, processes, "a", outbox__synchronous="full")
        await p.wait_ready()
        acknowledged: set[str] = set()

        async def app_client() -> None:
            async with aiohttp.ClientSession() as http:
                while True:
                    events = make_events(5)
                    try:
                        async with http.post(f"{p.url}/v1/events", json=events) as resp:
                            if resp.status == 202:
                                acknowledged.update(e["id"] for e in events)
                    except (aiohttp.ClientError, OSError):
                        return  # the process is gone

        clients = [asyncio.create_task(app_client()) for _ in range(16)]
        await eventually(lambda: len(acknowledged) > 300, timeout=30)  # under load
        p.kill()
        await asyncio.gather(*clients)
        assert len(acknowledged) > 100, "too little load to mean anything"
        again = launch(tmp_path, platform, processes, "b")
        await again.wait_ready()
        await platform.fake.wait_for(acknowledged, timeout=60)
        assert await again.terminate() == 0

    async def test_repeatedly_during_delivery(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """Killed three times while draining a backlog: nothing lost; duplicates only from
        batches in flight at each kill."""
        platform.fake.outage(3600)
        first = launch(tmp_path, platform, processes, "a", upstream__batch_max_events=50)
        await first.wait_ready()
        acknowledged: set[str] = set()
        for _ in range(30):
            events = make_events(100)
            assert await post(first.url, events) == 202
            acknowledged.update(e["id"] for e in events)
        first.kill()
        platform.fake.faults.outage_until = 0
        platform.fake.faults.latency_s = 0.2  # about 1,000 events/s: kills land mid-drain
        kills = 3

        def delivered_past(count: int) -> bool:  # a kill lands mid-drain
            return len(platform.fake.received) > count

        for n in range(kills):
            p = launch(tmp_path, platform, processes, f"k{n}", upstream__batch_max_events=50)
            await p.wait_ready()
            await eventually(functools.partial(delivered_past, len(platform.fake.received) + 50))
            p.kill()
        assert len(platform.fake.received) < len(acknowledged), "killed too late to matter"
        last = launch(tmp_path, platform, processes, "last", upstream__batch_max_events=50)
        await last.wait_ready()
        await platform.fake.wait_for(acknowledged, timeout=60)
        in_flight_per_kill = 4 * 50  # concurrency x batch_max_events
        assert platform.fake.duplicates <= kills * in_flight_per_kill
        assert await last.terminate() == 0


class TestSigterm:
    async def test_requests_in_flight_finish_before_exit(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """SIGTERM while a request upstream is under way: it finishes, is recorded as
        delivered, and the process exits 0."""
        platform.fake.faults.latency_s = 1.0
        p = launch(tmp_path, platform, processes, "a")
        await p.wait_ready()
        events = make_events(10)
        assert await post(p.url, events) == 202
        await eventually(lambda: platform.fake.requests_arrived > 0)  # at the (slow) platform
        assert await p.terminate(timeout=15) == 0
        assert {e["id"] for e in events} <= platform.fake.received.keys()
        stats = await outbox_stats(tmp_path / "a.toml")
        assert (stats["events"], stats["delivered_total"]) == (0, 10)

    async def test_refuses_new_events_while_stopping(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """Once SIGTERM arrives, ingest answers 503 until the process is gone."""
        platform.fake.faults.latency_s = 2.0
        p = launch(tmp_path, platform, processes, "a")
        await p.wait_ready()
        assert await post(p.url, make_events(1)) == 202
        await eventually(lambda: platform.fake.requests_arrived > 0)  # a send under way
        p.proc.send_signal(15)
        await eventually(lambda: "stopping" in p.events())
        status = 0
        with contextlib.suppress(aiohttp.ClientError):
            status = await post(p.url, make_events(1))
        assert status in (503, 0)  # 503 while draining, or already closed
        assert await p.wait_exit() == 0


class TestChaining:
    async def test_relay_to_gateway_to_timeback(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """A classroom relay with a static bearer token forwards to a school gateway's
        /caliper/event, which forwards to TimeBack with OAuth."""
        gateway_port = free_port()
        gateway = SidecarProcess(
            write_config(
                tmp_path / "gateway.toml",
                platform,
                tmp_path / "gateway.db",
                gateway_port,
                receiver__tokens=["relay-secret-0123456"],
            ),
            gateway_port,
            tmp_path / "gateway.log",
        )
        processes.append(gateway)
        relay_port = free_port()
        relay = SidecarProcess(
            write_config(
                tmp_path / "relay.toml",
                platform,
                tmp_path / "relay.db",
                relay_port,
                oauth=False,
                upstream__endpoint=f"http://127.0.0.1:{gateway_port}/caliper/event",
                upstream__bearer_token="relay-secret-0123456",
            ),
            relay_port,
            tmp_path / "relay.log",
        )
        processes.append(relay)
        await gateway.wait_ready()
        await relay.wait_ready()
        events = make_events(30)
        assert await post(relay.url, events) == 202
        await platform.fake.wait_for({e["id"] for e in events}, timeout=20)
        assert platform.fake.token_requests == 1  # only the gateway talks OAuth
        assert "relay-secret" not in relay.logs() + gateway.logs()
        assert await relay.terminate() == 0
        assert await gateway.terminate() == 0
