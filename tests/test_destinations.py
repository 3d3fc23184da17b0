"""[[destinations]] in a running sidecar (docs/destinations.md, docs/guarantees.md): every
accepted event goes to [upstream] and to each destination, each at its own pace; a destination
down costs the others nothing; each has its state, journey part and dead letters. Real parts:
the sidecar in-process over a SQLite file, two fake Caliper endpoints on real ports, an archive
on disk read back with `gzip -dc`."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.tools.fake_timeback import FakeTimeBack, RunningFake

from .conftest import (
    SidecarProcess,
    cli,
    eventually,
    free_port,
    make_events,
    settings_for,
    write_config,
)
from .destinations import DISTRICT_TOKEN, start_district, with_destinations
from .outboxes import BACKENDS, empty, fresh_database


@pytest.fixture
async def district() -> AsyncIterator[RunningFake]:
    running = await start_district()
    yield running
    await running.close()


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
async def sidecar(
    request: pytest.FixtureRequest, platform: RunningFake, district: RunningFake, tmp_path: Path
) -> Any:
    """A sidecar with the district and the archive as destinations, on each backend (on
    PostgreSQL: the module's database, emptied first)."""
    outbox: dict[str, Any] = {}
    if request.param == "postgres":
        url = request.getfixturevalue("database")
        await empty(url)
        outbox = {"url": url}
    running = await start(with_destinations(platform, district, tmp_path, outbox=outbox))
    yield running
    await running.stop()


async def post(sidecar: Sidecar, events: list[dict[str, Any]]) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sidecar.url}/v1/events", json=events) as resp,
    ):
        await resp.read()
        return resp.status


async def get(sidecar: Sidecar, path: str, **params: str) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{sidecar.url}{path}", params=params) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()


def hour_files(directory: Path) -> list[str]:
    files = sorted(str(p) for p in directory.glob("*/*/*/*.ndjson.gz"))
    assert files, f"no archive files in {directory}"
    return files


async def gzip_dc(directory: Path) -> list[dict[str, Any]]:
    """Every archived event, as the real `gzip -dc` reads all the hour files; it must have
    nothing to complain of (no torn member)."""
    files = hour_files(directory)
    child = await asyncio.create_subprocess_exec(
        "gzip",
        "-dc",
        *files,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    return [json.loads(line) for line in out.splitlines()]


def status_of(status: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [d for d in status["destinations"] if d["name"] == name]
    (one,) = found
    return one


class TestEveryEventEverywhere:
    async def test_events_reach_upstream_the_district_and_the_archive(
        self, sidecar: Sidecar, fake: FakeTimeBack, district: RunningFake, tmp_path: Path
    ) -> None:
        """Each accepted event reaches [upstream], the district's endpoint (with its own token,
        events unchanged) and the archive's files, once each."""
        events = make_events(30)
        ids = {e["id"] for e in events}
        assert await post(sidecar, events[:10]) == 202
        assert await post(sidecar, events[10:]) == 202
        await fake.wait_for(ids)
        await district.fake.wait_for(ids)
        await sidecar.dispatchers["archive"].drained(30)
        assert {i: district.fake.received[i] for i in ids} == {e["id"]: e for e in events}
        archived = await gzip_dc(tmp_path / "archive")
        assert sorted(archived, key=lambda e: e["id"]) == sorted(events, key=lambda e: e["id"])
        assert (fake.duplicates, district.fake.duplicates) == (0, 0)
        for name in ("district-lrs", "archive"):
            stats = await sidecar.outbox.destination_stats(name)
            assert (stats.waiting, stats.delivered_total) == (0, 30), name

    async def test_without_destinations_only_upstream_runs(
        self, platform: RunningFake, tmp_path: Path
    ) -> None:
        """A configuration without [[destinations]] runs [upstream]'s dispatcher alone, and
        its status lists [upstream] alone."""
        sidecar = await start(settings_for(platform, tmp_path))
        try:
            assert list(sidecar.dispatchers) == ["upstream"]
            status = await get(sidecar, "/v1/status")
            assert [d["name"] for d in status["destinations"]] == ["upstream"]
        finally:
            await sidecar.stop()


class TestOneDownCostsTheOthersNothing:
    async def test_a_district_down_for_long_catches_up_alone(
        self, sidecar: Sidecar, fake: FakeTimeBack, district: RunningFake, tmp_path: Path
    ) -> None:
        """While the district answers 503 to everything, [upstream] and the archive take every
        event, round after round; the district is backing off with them all waiting, none
        dead-lettered. Back up, it catches up alone: [upstream] is sent nothing again."""
        district.fake.fail_next(503, times=1_000_000)
        sent: list[dict[str, Any]] = []
        for _ in range(5):
            events = make_events(40)
            sent += events
            assert await post(sidecar, events) == 202
            await fake.wait_for({e["id"] for e in events})
        ids = {e["id"] for e in sent}
        await sidecar.dispatchers["archive"].drained(30)
        await eventually(lambda: sidecar.dispatchers["district-lrs"].state == "backing_off")

        status = await get(sidecar, "/v1/status")
        district_status = status_of(status, "district-lrs")
        assert district_status["kind"] == "caliper"
        assert district_status["state"] == "backing_off"
        assert district_status["waiting"] == 200
        assert "503" in district_status["last_error"]
        assert district_status["oldest_age_s"] >= 0
        assert (status_of(status, "upstream")["waiting"], status["upstream"]["state"]) == (0, "ok")
        assert status_of(status, "archive")["delivered_total"] == 200
        journey = await get(sidecar, f"/v1/events/{sent[0]['id']}")
        assert journey["state"] == "delivered"
        part = journey["destinations"]["district-lrs"]
        assert part["state"] == "waiting"
        assert part["attempts"] >= 1
        assert "503" in part["last_error"]
        assert journey["destinations"]["archive"]["state"] == "delivered"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{sidecar.url}/metrics") as resp,
        ):
            metrics = await resp.text()
        assert (
            'caliper_sidecar_upstream_state{destination="district-lrs",state="backing_off"} 1.0'
            in metrics
        )
        assert 'caliper_sidecar_upstream_state{destination="archive",state="ok"} 1.0' in metrics
        assert 'caliper_sidecar_upstream_state{destination="upstream",state="ok"} 1.0' in metrics
        assert 'caliper_sidecar_destination_events{destination="district-lrs"} 200.0' in metrics
        assert 'caliper_sidecar_destination_events{destination="archive"} 0.0' in metrics
        assert 'caliper_sidecar_destination_oldest_age_seconds{destination="district-lrs"}' in (
            metrics
        )
        assert district.fake.received == {}

        upstream_envelopes = fake.envelopes
        district.fake.faults.script.clear()  # the district is back
        await district.fake.wait_for(ids)
        await sidecar.dispatchers["district-lrs"].drained(30)
        assert fake.envelopes == upstream_envelopes
        assert fake.duplicates == 0
        assert await sidecar.outbox.dead_letters(10, destination="district-lrs") == []
        assert len(await gzip_dc(tmp_path / "archive")) == 200
        await eventually(lambda: sidecar.dispatchers["district-lrs"].state == "ok")


class TestDeadLettersByDestination:
    async def test_refused_at_the_district_only(
        self, sidecar: Sidecar, fake: FakeTimeBack, district: RunningFake
    ) -> None:
        """An event the district refuses is dead-lettered there alone: its journey says so,
        [upstream] and the archive have it, the admin routes list, replay and purge by
        destination, and a replay to the district sends it there only."""
        events = make_events(5)
        bad = events[2]["id"]
        district.fake.faults.refuse_ids = {bad}
        assert await post(sidecar, events) == 202
        await fake.wait_for({e["id"] for e in events})
        await sidecar.dispatchers["district-lrs"].drained(30)
        await sidecar.dispatchers["archive"].drained(30)

        journey = await get(sidecar, f"/v1/events/{bad}")
        assert journey["state"] == "delivered"
        assert "dead_letter" not in journey
        assert journey["destinations"]["district-lrs"]["state"] == "dead_lettered"
        assert journey["destinations"]["district-lrs"]["reason"] == "refused"
        assert journey["destinations"]["archive"]["state"] == "delivered"

        listed = await get(sidecar, "/v1/dead-letters")
        assert [(d["id"], d["destination"]) for d in listed["dead_letters"]] == [
            (bad, "district-lrs")
        ]
        assert listed["dead_letters"][0]["status"] == 422
        upstream = await get(sidecar, "/v1/dead-letters", destination="upstream")
        assert upstream["dead_letters"] == []
        status = await get(sidecar, "/v1/status")
        assert status_of(status, "district-lrs")["dead_letters"] == 1
        assert status_of(status, "district-lrs")["dead_lettered_total"] == 1
        assert status["outbox"]["dead_letters"] == 0

        district.fake.faults.refuse_ids = set()
        upstream_envelopes = fake.envelopes
        async with aiohttp.ClientSession(base_url=sidecar.url) as http:
            async with http.post(
                "/v1/dead-letters/purge", json={"all": True, "destination": "upstream"}
            ) as resp:
                assert await resp.json() == {"purged": 0}
            async with http.post(
                "/v1/dead-letters/replay", json={"all": True, "destination": "nowhere"}
            ) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"] == "unknown_destination"
            async with http.post(
                "/v1/dead-letters/replay", json={"ids": [bad], "destination": "district-lrs"}
            ) as resp:
                assert await resp.json() == {"replayed": 1}
        await district.fake.wait_for({bad})
        await sidecar.dispatchers["district-lrs"].drained(30)
        assert fake.envelopes == upstream_envelopes
        journey = await get(sidecar, f"/v1/events/{bad}")
        assert journey["destinations"]["district-lrs"]["state"] == "delivered"


class TestWhenFull:
    async def test_a_blocking_destination_down_fills_the_outbox(
        self, platform: RunningFake, district: RunningFake, tmp_path: Path
    ) -> None:
        """when_full = "block": with the district down, what waits for it fills the outbox:
        not ready, ingest answers 503, nothing is lost; back up, it drains and ingest goes on."""
        district.fake.fail_next(503, times=1_000_000)
        settings = with_destinations(platform, district, tmp_path, outbox={"max_events": 10})
        sidecar = await start(settings)
        try:
            events = make_events(10)
            assert await post(sidecar, events) == 202
            await platform.fake.wait_for({e["id"] for e in events})
            await sidecar.dispatchers["archive"].drained(30)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{sidecar.url}/readyz") as resp,
            ):
                assert (resp.status, (await resp.json())["reason"]) == (503, "outbox_full")
            assert await post(sidecar, make_events(1)) == 503
            district.fake.faults.script.clear()
            await district.fake.wait_for({e["id"] for e in events})
            await sidecar.dispatchers["district-lrs"].drained(30)
            assert await post(sidecar, make_events(1)) == 202
        finally:
            await sidecar.stop()

    async def test_a_lagging_destination_is_dead_lettered_when_it_does_not_block(
        self, platform: RunningFake, district: RunningFake, tmp_path: Path
    ) -> None:
        """when_full = "dead_letter": with the district down, ingest goes on past the outbox's
        limits and stays ready; the district's oldest events are dead-lettered for it
        (destination_lagging), [upstream] and the archive get every event."""
        district.fake.fail_next(503, times=1_000_000)
        settings = with_destinations(
            platform, district, tmp_path, when_full="dead_letter", outbox={"max_events": 10}
        )
        sidecar = await start(settings)
        try:
            first = make_events(10)
            assert await post(sidecar, first) == 202
            await platform.fake.wait_for({e["id"] for e in first})
            await sidecar.dispatchers["archive"].drained(30)
            more = make_events(5)
            assert await post(sidecar, more) == 202
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{sidecar.url}/readyz") as resp,
            ):
                assert resp.status == 200
            await platform.fake.wait_for({e["id"] for e in more})
            await sidecar.dispatchers["archive"].drained(30)
            dead = (await get(sidecar, "/v1/dead-letters", destination="district-lrs"))[
                "dead_letters"
            ]
            assert dead
            assert {d["reason"] for d in dead} == {"destination_lagging"}
            assert {d["id"] for d in dead} <= {e["id"] for e in first}
            status = status_of(await get(sidecar, "/v1/status"), "district-lrs")
            assert status["waiting"] + len(dead) == 15
            journey = await get(sidecar, f"/v1/events/{dead[0]['id']}")
            assert journey["state"] == "delivered"
            assert journey["destinations"]["district-lrs"]["reason"] == "destination_lagging"
        finally:
            await sidecar.stop()


def destinations_config(
    tmp_path: Path, platform: RunningFake, district: RunningFake | None, port: int, name: str
) -> Path:
    """A configuration file for the real `run`: the fake upstream, the district's endpoint
    (when given) and an archive `dir` relative to the file."""
    config = write_config(tmp_path / f"{name}.toml", platform, tmp_path / "outbox.db", port)
    text = ""
    if district is not None:
        text += (
            '\n[[destinations]]\nname = "district-lrs"\nkind = "caliper"\n'
            f'endpoint = "{district.events_url}"\nbearer_token = "{DISTRICT_TOKEN}"\n'
            "linger_ms = 20\ntimeout_s = 5\n"
        )
    text += '\n[[destinations]]\nname = "archive"\nkind = "archive"\ndir = "archive"\n'
    config.write_text(config.read_text() + text)
    return config


def launch(
    tmp_path: Path,
    platform: RunningFake,
    district: RunningFake | None,
    processes: list[SidecarProcess],
    name: str,
) -> tuple[SidecarProcess, Path]:
    port = free_port()
    config = destinations_config(tmp_path, platform, district, port, name)
    process = SidecarProcess(config, port, tmp_path / f"{name}.log")
    processes.append(process)
    return process, config


class TestTheRealProcess:
    async def test_the_cli_by_destination_beside_run(
        self,
        tmp_path: Path,
        platform: RunningFake,
        district: RunningFake,
        processes: list[SidecarProcess],
    ) -> None:
        """`caliper-sidecar run` delivers to every destination; beside it, `outbox stats`
        prints a line per destination, `dead-letters list` names each letter's destination
        and `--destination` lists, replays and purges one destination's only."""
        p, config = launch(tmp_path, platform, district, processes, "run")
        await p.wait_ready()
        events = make_events(4)
        ids = [e["id"] for e in events]
        district.fake.faults.refuse_ids = {ids[1], ids[2]}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{p.url}/v1/events", json=events) as resp,
        ):
            assert resp.status == 202
        await platform.fake.wait_for(set(ids))
        await district.fake.wait_for({ids[0], ids[3]})

        async def settled() -> bool:
            code, out, _ = await cli("outbox", "stats", "--json", "-c", str(config))
            theirs = {d["name"]: d for d in json.loads(out)["destinations"]}
            return code == 0 and theirs["archive"]["delivered_total"] == 4

        await eventually(settled, timeout=30)
        code, out, _ = await cli("outbox", "stats", "--json", "-c", str(config))
        stats = json.loads(out)
        assert stats["path"] == str(tmp_path / "outbox.db")
        assert [(d["name"], d["kind"]) for d in stats["destinations"]] == [
            ("upstream", "caliper"),
            ("district-lrs", "caliper"),
            ("archive", "archive"),
        ]
        district_stats = stats["destinations"][1]
        assert (district_stats["waiting"], district_stats["dead_letters"]) == (0, 2)
        code, out, _ = await cli("outbox", "stats", "-c", str(config))
        lines = [line for line in out.splitlines() if line.startswith("destination ")]
        assert [line.split()[1] for line in lines] == ["upstream", "district-lrs", "archive"]
        assert "dead letters 2" in lines[1]

        code, out, _ = await cli("dead-letters", "list", "-c", str(config))
        assert code == 0
        assert [line.split()[:2] for line in out.splitlines()] == [
            [ids[1], "district-lrs"],
            [ids[2], "district-lrs"],
        ]
        code, out, _ = await cli(
            "dead-letters", "list", "--json", "--destination", "upstream", "-c", str(config)
        )
        assert (code, out) == (0, "")
        code, out, _ = await cli(
            "dead-letters", "list", "--json", "--destination", "district-lrs", "-c", str(config)
        )
        letters = [json.loads(line) for line in out.splitlines()]
        assert [(d["id"], d["destination"], d["status"]) for d in letters] == [
            (ids[1], "district-lrs", 422),
            (ids[2], "district-lrs", 422),
        ]

        code, _, err = await cli(
            "dead-letters", "replay", "--all", "--destination", "nowhere", "-c", str(config)
        )
        assert code == 2
        assert "--destination nowhere: not a destination of this configuration" in err
        code, out, err = await cli(
            "dead-letters", "replay", ids[1], "--destination", "upstream", "-c", str(config)
        )
        assert (code, out.split()[:2]) == (1, ["replayed", "0"])
        assert f"not dead letters (nothing done): {ids[1]}" in err
        district.fake.faults.refuse_ids = set()
        upstream_envelopes = platform.fake.envelopes
        code, out, _ = await cli(
            "dead-letters", "replay", ids[1], "--destination", "district-lrs", "-c", str(config)
        )
        assert (code, out.split()[:2]) == (0, ["replayed", "1"])
        await district.fake.wait_for({ids[1]})
        code, out, _ = await cli(
            "dead-letters", "purge", "--all", "--destination", "upstream", "-c", str(config)
        )
        assert (code, out.split()[:2]) == (0, ["purged", "0"])
        code, out, _ = await cli(
            "dead-letters", "purge", "--all", "--destination", "district-lrs", "-c", str(config)
        )
        assert (code, out.split()[:2]) == (0, ["purged", "1"])
        code, out, _ = await cli("dead-letters", "list", "--json", "-c", str(config))
        assert (code, out) == (0, "")
        assert platform.fake.envelopes == upstream_envelopes
        assert ids[2] not in district.fake.received
        assert await p.terminate() == 0
        (stopped,) = [
            json.loads(line) for line in p.logs().splitlines() if '"event":"stopped"' in line
        ]
        assert stopped["destinations"] == {
            "district-lrs": {"waiting": 0, "sends_cut": 0},
            "archive": {"waiting": 0, "sends_cut": 0},
        }

    async def test_outbox_stats_names_a_destination_no_run_has_started(
        self, tmp_path: Path, platform: RunningFake
    ) -> None:
        """A destination added to the configuration but not yet started by `run` has no place
        in the outbox: `outbox stats` says so rather than failing."""
        sidecar = await start(settings_for(platform, tmp_path))  # no destinations
        await sidecar.stop()
        config = destinations_config(tmp_path, platform, None, free_port(), "added")
        code, out, err = await cli("outbox", "stats", "-c", str(config))
        assert code == 0, err
        assert "destination archive   archive  not started yet" in out
        code, out, _ = await cli("outbox", "stats", "--json", "-c", str(config))
        archive = json.loads(out)["destinations"][1]
        assert (archive["name"], archive["waiting"], archive["delivered_total"]) == (
            "archive",
            None,
            None,
        )

    async def test_sigkill_while_archiving_loses_no_acknowledged_event(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """`caliper-sidecar run` SIGKILLed three times under the load of 16 clients, each time
        as soon as an archive append has written (before the outbox records it), then a torn
        member left at the end of the newest file as a kill in the middle of a write leaves
        one: after a restart the torn member is cut back, `gzip -dc` reads every file whole,
        and every acknowledged event is in the archive at least once."""
        archive = tmp_path / "archive"
        acknowledged: set[str] = set()
        for n in range(3):
            p, _ = launch(tmp_path, platform, None, processes, f"k{n}")
            await p.wait_ready()
            acked = len(acknowledged)
            clients = [asyncio.create_task(app_client(p.url, acknowledged)) for _ in range(16)]
            target = acked + 2000
            await eventually(lambda: len(acknowledged) > target, timeout=60)  # noqa: B023
            await kill_as_the_archive_grows(p, archive)
            await asyncio.gather(*clients)
        # No kill has been seen to split a member (each goes in one write call): a torn one is
        # put there as it would be left, half a member after the last whole one.
        tear(Path(hour_files(archive)[-1]))
        last, config = launch(tmp_path, platform, None, processes, "last")
        await last.wait_ready()

        async def archived_all() -> bool:
            code, out, _ = await cli("outbox", "stats", "--json", "-c", str(config))
            theirs = {d["name"]: d for d in json.loads(out)["destinations"]}
            return code == 0 and theirs["archive"]["waiting"] == 0

        await eventually(archived_all, timeout=60)
        assert await last.terminate() == 0
        assert "archive_tail_cut" in last.events()
        archived = {e["id"] for e in await gzip_dc(archive)}
        assert acknowledged <= archived
        assert "torn" not in archived
        for file in hour_files(archive):
            child = await asyncio.create_subprocess_exec("gzip", "-t", file)
            assert await child.wait() == 0, file
        await platform.fake.wait_for(acknowledged, timeout=60)


def tear(file: Path) -> None:
    """Leave half a gzip member at the end of the file, as a write cut short leaves one."""
    member = gzip.compress(b'{"id": "torn"}\n' * 100)
    with file.open("ab") as f:
        f.write(member[: len(member) // 2])


async def kill_as_the_archive_grows(process: SidecarProcess, directory: Path) -> None:
    """SIGKILL the process as soon as the archive's files have grown: an append has written,
    and the outbox has most likely not recorded it yet."""
    size = archive_bytes(directory)
    deadline = time.monotonic() + 60
    while archive_bytes(directory) == size:
        assert time.monotonic() < deadline, "the archive did not grow under load"
        await asyncio.sleep(0.001)
    process.kill()


def archive_bytes(directory: Path) -> int:
    """The bytes of every hour file (0 before the first)."""
    return sum(p.stat().st_size for p in directory.glob("*/*/*/*.ndjson.gz"))


async def app_client(url: str, acknowledged: set[str]) -> None:
    """Post 5 events at a time until the process is gone; remember what was acknowledged."""
    async with aiohttp.ClientSession() as http:
        while True:
            events = make_events(5)
            try:
                async with http.post(f"{url}/v1/events", json=events) as resp:
                    if resp.status == 202:
                        acknowledged.update(e["id"] for e in events)
            except (aiohttp.ClientError, OSError):
                return


class TestAnArchiveThatCannotWrite:
    async def test_it_backs_off_alone_and_catches_up(
        self, platform: RunningFake, district: RunningFake, tmp_path: Path
    ) -> None:
        """An archive whose hour files cannot be written (a file where this year's directory
        must go) is backing_off, the error in its status, its events waiting, none lost;
        [upstream] and the district deliver meanwhile. Fixed, it archives them all."""
        archive = tmp_path / "archive"
        archive.mkdir()
        year = archive / time.strftime("%Y", time.gmtime())
        year.write_text("in the way")
        sidecar = await start(with_destinations(platform, district, tmp_path))
        try:
            events = make_events(20)
            ids = {e["id"] for e in events}
            assert await post(sidecar, events) == 202
            await platform.fake.wait_for(ids)
            await district.fake.wait_for(ids)
            await eventually(lambda: sidecar.dispatchers["archive"].state == "backing_off")
            status = status_of(await get(sidecar, "/v1/status"), "archive")
            assert (status["kind"], status["state"], status["waiting"]) == (
                "archive",
                "backing_off",
                20,
            )
            assert f"archive dir {archive}: cannot write" in status["last_error"]
            year.unlink()
            await sidecar.dispatchers["archive"].drained(30)
            assert {e["id"] for e in await gzip_dc(archive)} == ids
            await eventually(lambda: sidecar.dispatchers["archive"].state == "ok")
        finally:
            await sidecar.stop()
