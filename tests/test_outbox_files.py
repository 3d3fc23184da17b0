"""The outbox's file as operators and accidents treat it (docs/guarantees.md): unusable at start,
replaced while running, reached through links, and dead letters by the hundred thousand."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path

import msgspec
import pytest

from caliper_sidecar.app import start
from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.exceptions import OutboxLocked
from caliper_sidecar.outbox import NewEvent, sqlite_outbox
from caliper_sidecar.outbox.sqlite.storage import PAGE_SIZE, RESERVE_BYTES, SqliteStorage
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import (
    StartSidecar,
    cli,
    free_port,
    make_event,
    new_id,
    settings_for,
    write_config,
)


class TestUnusableOutboxAtStart:
    """#14: an outbox that cannot be used is one line naming outbox.path, and exit 1 (exit 2
    where `run`'s checks before it starts can tell, as `check-config` does: a directory)."""

    @pytest.mark.parametrize("kind", ["garbage", "directory", "unwritable"])
    @pytest.mark.parametrize("command", [["run"], ["outbox", "stats"], ["dead-letters", "list"]])
    async def test_one_line_and_exit_1(
        self, platform: RunningFake, tmp_path: Path, kind: str, command: list[str]
    ) -> None:
        outbox = tmp_path / "outbox.db"
        if kind == "garbage":
            outbox.write_bytes(b"this is not a database, just bytes\n" * 200)
        elif kind == "directory":
            outbox.mkdir()
        else:
            outbox = Path("/proc/caliper-sidecar-test/outbox.db")
        config = write_config(tmp_path / "c.toml", platform, outbox, free_port())
        code, _, err = await cli(*command, "-c", str(config))
        assert code == (2 if kind == "directory" and command == ["run"] else 1), err
        lines = [
            line for line in err.splitlines() if line.strip() and "preflight_warning" not in line
        ]
        assert len(lines) == 1, err
        assert "outbox.path" in lines[0]
        assert str(outbox) in lines[0]


def break_outbox(path: Path, how: str) -> None:
    """Delete the outbox with its WAL, or truncate it, as a careless operator (or a cleanup
    job) would. (Truncating the `-shm` index under a running SQLite is a SIGBUS for any
    process that maps it: nothing a program can survive, so not tried.)"""
    if how == "truncated":
        os.truncate(path, 0)
        return
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class TestOutboxReplacedWhileRunning:
    """#13: an outbox deleted or truncated under a running sidecar: 503 and not ready, never
    a 500, never a 202 for an event stored nowhere."""

    @pytest.mark.parametrize("how", ["deleted", "truncated"])
    async def test_routes_answer_503_not_500(
        self, custom: StartSidecar, tmp_path: Path, how: str
    ) -> None:
        sidecar, client = await custom()
        async with client.post("/v1/events", json=make_event()) as resp:
            assert resp.status == 202
        break_outbox(Path(sidecar.runtime.settings.outbox.path), how)
        async with client.post("/v1/events", json=make_event()) as resp:
            assert resp.status == 503, await resp.text()
        async with client.get("/readyz") as resp:
            assert resp.status == 503
        for route in ("/v1/status", "/metrics", "/v1/dead-letters", "/healthz"):
            async with client.get(route) as resp:
                assert resp.status in (200, 503), (route, resp.status)


class TestOneRunPerOutboxThroughLinks:
    """#4: one `run` per outbox holds through symlinks and hard links."""

    @pytest.mark.parametrize("link", ["symlink", "hardlink"])
    async def test_second_run_through_a_link_is_refused(
        self, platform: RunningFake, tmp_path: Path, link: str
    ) -> None:
        first = settings_for(platform, tmp_path)
        running = await start(first)
        try:
            other = tmp_path / "elsewhere"
            other.mkdir()
            alias = other / "alias.db"
            if link == "symlink":
                alias.symlink_to(first.outbox.path)
            else:
                os.link(first.outbox.path, alias)
            second = msgspec.structs.replace(
                first, outbox=msgspec.structs.replace(first.outbox, path=str(alias))
            )
            with pytest.raises(OutboxLocked, match="in use"):
                await start(second)
        finally:
            await running.stop()


def many_dead_letters(path: Path, n: int) -> None:
    """Put n dead letters straight into an outbox file (as a long outage with a bad app
    would, only faster)."""
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO dead_letters (id, body, received_at, reason, status, response, "
            "attempts, dead_lettered_at) VALUES (?, ?, 0, 'refused', 422, '', 1, 0)",
            [(new_id(), json.dumps(make_event()).encode()) for _ in range(n)],
        )
    conn.close()


class TestLargeDeadLetterOperations:
    """#10: replay and purge of many dead letters go in chunks: a running sidecar's ingest
    never waits behind one huge transaction, and the operator sees a running count."""

    async def test_replay_all_is_chunked_and_counted(self, tmp_path: Path) -> None:
        path = tmp_path / "outbox.db"
        async with sqlite_outbox(OutboxSettings(path=str(path))) as outbox:
            pass
        many_dead_letters(path, 4500)
        seen: list[int] = []
        async with sqlite_outbox(OutboxSettings(path=str(path))) as outbox:
            appended = asyncio.ensure_future(outbox.append([NewEvent(new_id(), b"{}")]))
            assert await outbox.replay_dead_letters(None, progress=seen.append) == 4500
            await appended
            assert (await outbox.stats()).events == 4501
        assert seen == [1000, 2000, 3000, 4000, 4500]

    async def test_cli_shows_a_running_count(self, platform: RunningFake, tmp_path: Path) -> None:
        path = tmp_path / "outbox.db"
        async with sqlite_outbox(OutboxSettings(path=str(path))):
            pass
        many_dead_letters(path, 2500)
        config = write_config(tmp_path / "c.toml", platform, path, free_port())
        code, _, err = await cli("dead-letters", "purge", "--all", "-c", str(config))
        assert code == 0, err
        assert "1000" in err
        assert "2000" in err
        async with sqlite_outbox(OutboxSettings(path=str(path))) as outbox:
            assert (await outbox.stats()).dead_letters == 0


class TestPagesThatWriteLittle:
    """Issue 33: what a new outbox writes per event (bench/writes.py measures it, docs/
    operators.md "Writes to the disk"): small pages, and nothing rewritten only to zero it."""

    async def test_a_new_outbox_has_small_pages(self, tmp_path: Path) -> None:
        path = tmp_path / "outbox.db"
        async with sqlite_outbox(OutboxSettings(path=str(path))) as outbox:
            await outbox.append([NewEvent(new_id(), json.dumps(make_event()).encode())])
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA page_size").fetchone() == (PAGE_SIZE,)

    async def test_an_older_outbox_keeps_its_pages_and_its_events(self, tmp_path: Path) -> None:
        path = tmp_path / "outbox.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA page_size = 4096")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.close()
        async with sqlite_outbox(OutboxSettings(path=str(path))) as outbox:
            await outbox.append([NewEvent(new_id(), b"{}") for _ in range(3)])
        async with sqlite_outbox(OutboxSettings(path=str(path))) as outbox:
            assert (await outbox.stats()).events == 3
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA page_size").fetchone() == (4096,)

    @pytest.mark.parametrize("page_size", [PAGE_SIZE, 4096])
    async def test_the_wal_s_backstop_fits_in_the_room_kept_for_it(
        self, tmp_path: Path, page_size: int
    ) -> None:
        """SQLite checkpoints by itself once the WAL holds `wal_autocheckpoint` pages, where
        the background checkpoints fell behind: bytes that must fit in the room the capacity
        check keeps (RESERVE_BYTES), on an older file's 4 KB pages too."""
        path = tmp_path / "outbox.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(f"PRAGMA page_size = {page_size}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.close()
        async with sqlite_outbox(OutboxSettings(path=str(path))) as outbox:
            storage = outbox.storage
            assert isinstance(storage, SqliteStorage)
            (pages,) = await storage._writer.run(
                lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()
            )
        assert 0 < pages * page_size <= RESERVE_BYTES // 2

    async def test_deleting_zeroes_only_what_costs_no_write(self, tmp_path: Path) -> None:
        async with sqlite_outbox(OutboxSettings(path=str(tmp_path / "outbox.db"))) as outbox:
            storage = outbox.storage
            assert isinstance(storage, SqliteStorage)
            mode = await storage._writer.run(
                lambda conn: conn.execute("PRAGMA secure_delete").fetchone()
            )
            assert mode == (2,)  # FAST
