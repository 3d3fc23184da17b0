"""`caliper-sidecar tail` against a real `run`: what happens to events, as it happens, per
destination, with sender labels and ids, never event content; admin-protected."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp

from caliper_sidecar.tap import Tap
from caliper_sidecar.tools.fake_timeback import RunningFake
from caliper_sidecar.tools.tail import render

from .conftest import SidecarProcess, eventually, free_port, make_events, write_config

TOKEN = "room-12-sender-token-0123456789"
ADMIN = "the-admin-token-0123456789"


def start(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> tuple[SidecarProcess, Path]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"room-12 {TOKEN}\n")
    tokens.chmod(0o600)
    port = free_port()
    config = write_config(
        tmp_path / "sidecar.toml",
        platform,
        tmp_path / "outbox.db",
        port,
        receiver__tokens_file=str(tokens),
        admin__token=ADMIN,
    )
    process = SidecarProcess(config, port, tmp_path / "run.log")
    processes.append(process)
    return process, config


async def test_tail_follows_events_without_their_content(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    process, config = start(tmp_path, platform, processes)
    await process.wait_ready()
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "caliper_sidecar",
        "tail",
        "--json",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert follower.stdout is not None
    lines: list[dict[str, Any]] = []
    raw: list[bytes] = []

    async def read() -> None:
        assert follower.stdout is not None
        async for line in follower.stdout:
            raw.append(line)
            lines.append(json.loads(line))

    reader = asyncio.create_task(read())
    try:
        await eventually(lambda: any(x["what"] == "tailing" for x in lines))
        marker = "Tail-Marker-Learner"
        events = make_events(3)
        for e in events:
            e["extensions"] = {"who": marker}
        platform.fake.faults.refuse_ids = {events[2]["id"]}
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{process.url}/v1/events",
                json=events,
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as resp,
        ):
            assert resp.status == 202

        def seen(what: str) -> list[dict[str, Any]]:
            return [x for x in lines if x["what"] == what]

        await eventually(lambda: seen("sent") and seen("dead_lettered"), timeout=20)
        (accepted,) = seen("accepted")
        assert accepted["ids"] == [e["id"] for e in events]
        assert (accepted["events"], accepted["sender"]) == (3, "room-12")
        sent = {i for x in seen("sent") for i in x["ids"]}
        assert sent == {events[0]["id"], events[1]["id"]}
        assert {x["destination"] for x in seen("sent")} == {"upstream"}
        (dead,) = seen("dead_lettered")
        assert (dead["ids"], dead["reason"], dead["status"]) == ([events[2]["id"]], "refused", 422)
        assert marker.encode() not in b"".join(raw)
    finally:
        follower.terminate()
        await follower.wait()
        reader.cancel()


async def test_tail_needs_the_admin_token(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    process, _ = start(tmp_path, platform, processes)
    await process.wait_ready()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{process.url}/v1/tail") as resp:
            assert resp.status == 401
        async with http.get(
            f"{process.url}/v1/tail", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            assert resp.status == 401


async def test_a_slow_watcher_loses_lines_and_is_told_how_many() -> None:
    """Never memory: past its queue, a watcher's lines are dropped, and it is told."""
    tap = Tap()
    with tap.watching() as watcher:
        for n in range(1005):
            tap.publish("accepted", [f"urn:uuid:{n}"])
        first = [await watcher.get() for _ in range(1000)]
        assert first[0]["ids"] == ["urn:uuid:0"]
        tap.publish("accepted", ["urn:uuid:last"])
        gap = await watcher.get()
        assert (gap["what"], gap["lines"]) == ("dropped", 5)
        assert (await watcher.get())["ids"] == ["urn:uuid:last"]
    assert not tap.watched


def test_lines_for_people() -> None:
    line = {
        "at": 0,
        "what": "sent",
        "destination": "district-lrs",
        "events": 25,
        "ids": ["urn:uuid:a", "urn:uuid:b"],
    }
    text = render(line)
    assert "sent" in text
    assert "to district-lrs" in text
    assert "25 events" in text
    assert "urn:uuid:a urn:uuid:b (+23)" in text
