"""Dead letters you can act on: the admin routes, and the CLI on a running sidecar's outbox."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import (
    SidecarProcess,
    cli,
    eventually,
    free_port,
    make_events,
    settings_for,
    write_config,
)


async def poisoned(sidecar: Sidecar, platform: RunningFake, n: int = 3) -> list[str]:
    """Send n events the platform refuses; returns their ids once all are dead letters."""
    events = make_events(n)
    ids = [e["id"] for e in events]
    platform.fake.faults.refuse_ids |= set(ids)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sidecar.url}/v1/events", json=events) as resp,
    ):
        assert resp.status == 202

    async def all_dead() -> bool:
        return (await sidecar.outbox.stats()).dead_letters == n

    await eventually(all_dead)
    return ids


@pytest.fixture
async def admin_sidecar(platform: RunningFake, tmp_path: Path) -> AsyncIterator[Sidecar]:
    sidecar = await start(settings_for(platform, tmp_path, admin={"token": "admin-secret"}))
    yield sidecar
    await sidecar.stop()


class TestRoutes:
    async def test_list_replay_purge(self, sidecar: Sidecar, platform: RunningFake) -> None:
        """List shows the event and why; replay delivers it once accepted; purge deletes."""
        ids = await poisoned(sidecar, platform)
        async with aiohttp.ClientSession(base_url=sidecar.url) as http:
            async with http.get("/v1/dead-letters", params={"limit": "2"}) as resp:
                page = await resp.json()
            assert [d["id"] for d in page["dead_letters"]] == ids[:2]
            first = page["dead_letters"][0]
            assert (first["reason"], first["status"]) == ("refused", 422)
            assert first["event"]["id"] == ids[0]
            assert page["next_after"] == ids[1]
            async with http.get("/v1/dead-letters", params={"after": ids[1]}) as resp:
                assert [d["id"] for d in (await resp.json())["dead_letters"]] == ids[2:]

            platform.fake.faults.refuse_ids.clear()  # the platform was fixed
            async with http.post("/v1/dead-letters/replay", json={"ids": [ids[0]]}) as resp:
                assert await resp.json() == {"replayed": 1}
            await platform.fake.wait_for({ids[0]})
            async with http.post("/v1/dead-letters/purge", json={"all": True}) as resp:
                assert await resp.json() == {"purged": 2}

        async def emptied() -> bool:
            # The platform has the replayed event before the sidecar has recorded its answer.
            stats = await sidecar.outbox.stats()
            return (stats.dead_letters, stats.events) == (0, 0)

        await eventually(emptied)

    @pytest.mark.parametrize("body", [{}, {"ids": []}, {"ids": [1]}, {"all": "yes"}, "x"])
    async def test_bad_selection(self, client: aiohttp.ClientSession, body: Any) -> None:
        async with client.post("/v1/dead-letters/replay", json=body) as resp:
            assert resp.status == 400
            assert "ids" in (await resp.json())["message"]

    async def test_admin_token_required_when_set(self, admin_sidecar: Sidecar) -> None:
        async with aiohttp.ClientSession(base_url=admin_sidecar.url) as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with http.get("/v1/dead-letters", headers=headers) as resp:
                    assert resp.status == 401
            async with http.get(
                "/v1/dead-letters", headers={"Authorization": "Bearer admin-secret"}
            ) as resp:
                assert resp.status == 200


class TestCommandsBesideRun:
    async def test_stats_list_replay_purge_while_running(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """The CLI works on the outbox of a running sidecar, which then sends the replay."""
        port = free_port()
        config = write_config(tmp_path / "c.toml", platform, tmp_path / "outbox.db", port)
        p = SidecarProcess(config, port, tmp_path / "run.log")
        processes.append(p)
        await p.wait_ready()
        events = make_events(4)
        ids = [e["id"] for e in events]
        platform.fake.faults.refuse_ids = set(ids[:3])
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{p.url}/v1/events", json=events) as resp,
        ):
            assert resp.status == 202
        await platform.fake.wait_for({ids[3]})

        async def three_dead() -> bool:
            code, out, _ = await cli("outbox", "stats", "--json", "-c", str(config))
            return code == 0 and json.loads(out)["dead_letters"] == 3

        await eventually(three_dead)
        code, out, _ = await cli("dead-letters", "list", "-c", str(config), "--json")
        assert code == 0
        listed = [json.loads(line) for line in out.splitlines()]
        assert [d["id"] for d in listed] == ids[:3]
        assert listed[0]["status"] == 422

        platform.fake.faults.refuse_ids.clear()
        code, out, _ = await cli("dead-letters", "replay", "-c", str(config), ids[0], ids[1])
        assert (code, "replayed 2") == (0, out[:10])
        await platform.fake.wait_for(set(ids[:2]) | {ids[3]})
        code, out, _ = await cli("dead-letters", "purge", "-c", str(config), "--all")
        assert "purged 1" in out
        code, out, _ = await cli("outbox", "stats", "--json", "-c", str(config))
        stats = json.loads(out)
        assert (stats["events"], stats["dead_letters"], stats["dead_lettered_total"]) == (0, 0, 3)
        assert await p.terminate() == 0

    async def test_missing_outbox_is_a_clear_error(self, tmp_path: Path) -> None:
        config = tmp_path / "c.toml"
        config.write_text(f'[outbox]\npath = "{tmp_path / "none.db"}"\n')
        code, _, err = await cli("outbox", "stats", "-c", str(config))
        assert code == 1
        assert "there is no outbox at" in err
        assert not (tmp_path / "none.db").exists()


class TestStorageUnavailable:
    async def test_admin_and_status_answer_503_not_500(
        self, sidecar: Sidecar, client: aiohttp.ClientSession
    ) -> None:
        """When the outbox cannot be used (a full disk, shutting down), operator routes say
        so with 503 and Retry-After, like ingest, instead of failing with a 500."""
        from caliper_sidecar.exceptions import OutboxUnavailable

        async def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise OutboxUnavailable("disk_full", "the disk holding the outbox is full", 30)

        sidecar.outbox.replay_dead_letters = unavailable  # type: ignore[method-assign]
        sidecar.outbox.stats = unavailable  # type: ignore[method-assign]
        for method, path, body in (
            ("POST", "/v1/dead-letters/replay", {"all": True}),
            ("GET", "/v1/status", None),
            ("GET", "/metrics", None),
        ):
            async with client.request(method, path, json=body) as resp:
                assert resp.status == 503, path
                assert resp.headers["Retry-After"] == "30"
                assert (await resp.json())["error"] == "disk_full"
