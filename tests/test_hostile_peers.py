"""Hostile networks and peers (docs/guarantees.md): slow and trickling clients, many connections,
heavy requests at once, and a shutdown that stays bounded through all of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from caliper_sidecar.http import connections
from caliper_sidecar.tools.fake_timeback import RunningFake
from caliper_sidecar.validation import MAX_FINDINGS

from .conftest import (
    SidecarProcess,
    StartSidecar,
    eventually,
    free_port,
    make_event,
    write_config,
)


class TestConnectionDeadlinesAndBound:
    """#2: connections that never complete a request are closed; open connections are bounded;
    the condition is logged once."""

    @pytest.fixture(autouse=True)
    def short_deadlines(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(connections, "HEADERS_DEADLINE_S", 1.0)
        monkeypatch.setattr(connections, "BODY_DEADLINE_S", 1.0)
        monkeypatch.setattr(connections, "MAX_CONNECTIONS", 30)

    async def closed_by_server(self, url: str, send: bytes) -> bytes:
        """Send these bytes and keep the connection open; what the server answered before it
        closed (within 10 s, else the test fails)."""
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(send)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    @pytest.mark.parametrize(
        "send",
        [
            pytest.param(b"", id="idle"),
            pytest.param(
                b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty", id="headers"
            ),
        ],
    )
    async def test_incomplete_headers_are_closed(self, custom: StartSidecar, send: bytes) -> None:
        sidecar, _ = await custom()
        assert await self.closed_by_server(sidecar.url, send) == b""

    @pytest.mark.parametrize(
        "send",
        [
            pytest.param(b"Content-Length: 5000\r\n\r\n[{", id="short-body"),
            pytest.param(b'Transfer-Encoding: chunked\r\n\r\n5\r\n[{"a"\r\n', id="endless-chunks"),
        ],
    )
    async def test_bodies_that_never_end_get_408(self, custom: StartSidecar, send: bytes) -> None:
        sidecar, _ = await custom()
        head = b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        answer = await self.closed_by_server(sidecar.url, head + send)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]

    async def test_a_flood_of_idle_connections_does_not_starve_real_requests(
        self, custom: StartSidecar
    ) -> None:
        sidecar, client = await custom()
        host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
        with capture_logs() as logs:
            idle = [await asyncio.open_connection(host, int(port)) for _ in range(60)]
        try:
            with capture_logs() as more:
                for _ in range(5):
                    async with client.get("/healthz") as resp:
                        assert resp.status == 200
                    async with client.post("/v1/events", json=make_event()) as resp:
                        assert resp.status == 202
            limited = [e for e in logs + more if e["event"] == "connections_limited"]
            assert len(limited) == 1
            assert len(sidecar.runner.server.connections) <= 30  # type: ignore[union-attr]
        finally:
            for _, writer in idle:
                writer.close()

    async def test_more_idle_connections_than_descriptors(
        self, platform: RunningFake, tmp_path: Path, processes: list[SidecarProcess]
    ) -> None:
        """The defect as found: 1,100 idle connections to a process limited to 1,024 open
        files. /healthz and ingest still answer, the log has one line about it and no
        'accept() out of system resource' traceback."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1400:
            pytest.skip(f"this test process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
        port = free_port()
        config = write_config(tmp_path / "c.toml", platform, tmp_path / "outbox.db", port)
        process = SidecarProcess(config, port, tmp_path / "run.log", max_files=1024)
        processes.append(process)
        await process.wait_ready()
        idle = []
        try:
            for _ in range(1100):
                idle.append(await asyncio.open_connection("127.0.0.1", port))
            async with aiohttp.ClientSession(base_url=process.url) as client:
                for _ in range(3):
                    async with client.get("/healthz") as resp:
                        assert resp.status == 200
                    async with client.post("/v1/events", json=make_event()) as resp:
                        assert resp.status == 202
        finally:
            for _, writer in idle:
                writer.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert await process.terminate() == 0
        logs = process.logs()
        assert "out of system resource" not in logs
        assert process.events().count("connections_limited") == 1


def noisy_event(size: int) -> dict[str, Any]:
    """An event whose object has as many unknown properties as fit in `size` bytes: each one is
    a warning."""
    event = make_event()
    count = size // 22
    event["object"].update({f"k{i:07d}": 1 for i in range(count)})
    return event


class TestBoundedMemory:
    """#6: memory stays bounded whatever many clients send at once."""

    async def test_findings_per_answer_are_bounded_and_counted(
        self, client: aiohttp.ClientSession
    ) -> None:
        event = noisy_event(200_000)
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202
            body = await resp.json()
        assert len(body["warnings"]) == MAX_FINDINGS
        assert body["warnings_total"] > 9000
        broken = [make_event(action="Glanced") for _ in range(300)]
        async with client.post("/v1/events", json=broken) as resp:
            assert resp.status == 422
            body = await resp.json()
        assert len(body["errors"]) == MAX_FINDINGS
        assert body["errors_total"] == 300

    async def test_many_heavy_requests_at_once(
        self, platform: RunningFake, tmp_path: Path, processes: list[SidecarProcess]
    ) -> None:
        """24 concurrent requests of 1 MiB, each full of warnings: the process's peak memory
        stays bounded (it reached 447 MB, with a 14 s stall of the event loop)."""
        port = free_port()
        config = write_config(
            tmp_path / "c.toml",
            platform,
            tmp_path / "outbox.db",
            port,
            upstream__batch_max_bytes=2_000_000,
        )
        process = SidecarProcess(config, port, tmp_path / "run.log")
        processes.append(process)
        await process.wait_ready()
        body = json.dumps(noisy_event(1_000_000)).encode()
        assert len(body) < 1_048_576

        async def one(client: aiohttp.ClientSession) -> int:
            async with client.post(
                "/v1/events", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                return resp.status

        async with aiohttp.ClientSession(base_url=process.url) as client:
            statuses = await asyncio.gather(*(one(client) for _ in range(24)))
        assert set(statuses) <= {202, 503}
        assert 202 in statuses
        peak_mb = peak_rss_kib(process.proc.pid) / 1024
        assert peak_mb < 250, f"peak RSS {peak_mb:.0f} MB"


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


class TestShutdownIsBounded:
    """#15: SIGTERM with a client trickling its body still exits 0, well within the shipped
    stop timeouts (systemd's TimeoutStopSec and Kubernetes' grace period, 60 s)."""

    async def test_sigterm_with_a_trickling_client(
        self, platform: RunningFake, tmp_path: Path, processes: list[SidecarProcess]
    ) -> None:
        port = free_port()
        config = write_config(tmp_path / "c.toml", platform, tmp_path / "outbox.db", port)
        process = SidecarProcess(config, port, tmp_path / "run.log")
        processes.append(process)
        await process.wait_ready()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n["
        )
        await writer.drain()

        trickled = 0

        async def trickle() -> None:  # a byte every half second: a slow client, not a dead one
            nonlocal trickled
            with contextlib.suppress(ConnectionError):
                while True:
                    await asyncio.sleep(0.5)
                    writer.write(b" ")
                    await writer.drain()
                    trickled += 1

        trickling = asyncio.ensure_future(trickle())
        await eventually(lambda: trickled >= 2)
        try:
            assert await process.terminate(timeout=25) == 0
        finally:
            trickling.cancel()
            writer.close()
        assert "stopped" in process.events()


class TestByteBudget:
    """The bodies held at once stay within the budget (whether or not a request finds room
    without waiting), and a small body that fits is not held up behind a large one waiting."""

    async def test_a_full_budget_makes_the_next_wait_until_room_is_given_back(self) -> None:
        budget = connections.ByteBudget(100)
        await budget.take(60)
        await budget.take(40)
        waiting = asyncio.create_task(budget.take(50))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await budget.give_back(60)
        await asyncio.wait_for(waiting, 1)
        await budget.give_back(40)
        await budget.give_back(50)
        await budget.take(100)  # all of it is free again

    async def test_a_small_body_that_fits_goes_on_while_a_large_one_waits(self) -> None:
        budget = connections.ByteBudget(100)
        await budget.take(90)
        large = asyncio.create_task(budget.take(50))
        await asyncio.sleep(0.01)
        await asyncio.wait_for(budget.take(5), 1)
        assert not large.done()
        blocked = asyncio.create_task(budget.take(10))  # 5 left: waits too
        await asyncio.sleep(0.01)
        assert not blocked.done()
        await budget.give_back(90)
        await asyncio.wait_for(asyncio.gather(large, blocked), 1)

    async def test_a_request_larger_than_the_budget_takes_all_of_it(self) -> None:
        budget = connections.ByteBudget(100)
        await budget.take(1000)
        blocked = asyncio.create_task(budget.take(1))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        await budget.give_back(1000)
        await asyncio.wait_for(blocked, 1)
