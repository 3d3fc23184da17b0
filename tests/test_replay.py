"""`caliper-sidecar replay` (caliper_sidecar/tools/replay.py, docs/archive.md "Replay"): the
events an archive kept, queued again for the named destinations while `run` runs. Real parts:
`run` and the command in subprocesses, the fake TimeBack and a district's endpoint on real
ports, the outbox in a SQLite file or the local PostgreSQL."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.delivery.archive import Archive, ArchivedEvent
from caliper_sidecar.outbox import sqlite_outbox
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SidecarProcess, cli, eventually, free_port, make_event, write_config
from .destinations import DISTRICT_TOKEN, start_district
from .outboxes import BACKENDS, empty, fresh_database
from .test_destinations import gzip_dc

LEARNER = "https://example.edu/users/554433"
OTHER = "https://example.edu/users/112233"


def at(seconds_ago: float) -> str:
    """An eventTime that long ago, as apps write it."""
    t = time.gmtime(time.time() - seconds_ago)
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", t)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture
async def district() -> AsyncIterator[RunningFake]:
    running = await start_district()
    yield running
    await running.close()


def config_for(
    tmp_path: Path,
    platform: RunningFake,
    port: int,
    district: RunningFake | None = None,
    url: str | None = None,
    archives: tuple[str, ...] = ("archive",),
    name: str = "sidecar",
) -> Path:
    """A configuration for `run` and `replay`: the fake upstream, the district's endpoint
    (when given), archives with dirs beside the file, the outbox in a SQLite file or at `url`."""
    extra: dict[str, Any] = {} if url is None else {"outbox__url": url}
    config = write_config(
        tmp_path / f"{name}.toml", platform, tmp_path / "outbox.db", port, **extra
    )
    text = ""
    if district is not None:
        text += (
            '\n[[destinations]]\nname = "district-lrs"\nkind = "caliper"\n'
            f'endpoint = "{district.events_url}"\nbearer_token = "{DISTRICT_TOKEN}"\n'
            "linger_ms = 20\ntimeout_s = 5\n"
        )
    for name in archives:
        text += f'\n[[destinations]]\nname = "{name}"\nkind = "archive"\ndir = "{name}"\n'
    config.write_text(config.read_text() + text)
    return config


async def running(
    tmp_path: Path, processes: list[SidecarProcess], config: Path, port: int
) -> SidecarProcess:
    process = SidecarProcess(config, port, tmp_path / "run.log")
    processes.append(process)
    await process.wait_ready()
    return process


async def post(process: SidecarProcess, events: list[dict[str, Any]]) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{process.url}/v1/events", json=events) as resp,
    ):
        assert resp.status == 202, await resp.text()


async def journey(process: SidecarProcess, event_id: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{process.url}/v1/events/{event_id}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        found: dict[str, Any] = await resp.json()
        return found


async def delivered(process: SidecarProcess, event_id: str) -> bool:
    return bool((await journey(process, event_id))["state"] == "delivered")


async def archived(config: Path, count: int) -> None:
    """Wait until the archive has taken `count` events."""

    async def there() -> bool:
        code, out, _ = await cli("outbox", "stats", "--json", "-c", str(config))
        theirs = {d["name"]: d for d in json.loads(out)["destinations"]}
        return code == 0 and theirs["archive"]["delivered_total"] == count

    await eventually(there, timeout=30)


class TestAWipedPlatformGetsEverythingBack:
    @pytest.mark.parametrize("backend", BACKENDS)
    async def test_replay_while_run_runs(
        self,
        tmp_path: Path,
        platform: RunningFake,
        processes: list[SidecarProcess],
        backend: str,
        request: pytest.FixtureRequest,
    ) -> None:
        """`run` with an archive delivers every event; the platform loses them all (restored
        from an old backup); `replay --since`, beside the running `run`, queues them again,
        and `run` sends every one, id and body unchanged, without a restart; each journey
        marks it replayed for upstream; the archive is not written to again."""
        url = None
        if backend == "postgres":
            url = request.getfixturevalue("database")
            await empty(url)
        port = free_port()
        config = config_for(tmp_path, platform, port, url=url)
        process = await running(tmp_path, processes, config, port)
        events = [make_event(eventTime=at(1800)) for _ in range(20)]
        ids = {e["id"] for e in events}
        await post(process, events[:10])
        await post(process, events[10:])
        await platform.fake.wait_for(ids)
        await archived(config, 20)
        platform.fake.wipe()
        assert not platform.fake.received

        code, out, err = await cli("replay", "--since", "2h", "-c", str(config))
        assert code == 0, err
        assert out.splitlines()[0].startswith("read 20 events from ")
        assert out.splitlines()[0].endswith(f"of the archive archive ({tmp_path / 'archive'})")
        assert out.splitlines()[1:3] == [
            "queued 20 events again: upstream 20",
            "skipped 0: 0 with eventTime outside the range, 0 of another actor, 0 archived "
            "twice, 0 unreadable",
        ]
        await platform.fake.wait_for(ids, timeout=20)
        assert {i: platform.fake.received[i] for i in ids} == {e["id"]: e for e in events}
        await eventually(
            lambda: delivered(process, events[3]["id"]), timeout=10
        )  # the platform's answer recorded
        found = await journey(process, events[3]["id"])
        assert [(m["what"], m["destination"]) for m in found["marks"]] == [("replayed", "upstream")]
        assert len(await gzip_dc(tmp_path / "archive")) == 20
        assert await process.terminate() == 0


def own_disk(disk: Path, seen_as: Path) -> list[str]:
    """A command prefix that runs the rest in a mount namespace of its own where `seen_as` is
    `disk`: another machine's local disk at the same path (replicas agree on an archive's
    `dir`). Needs root and unshare(1)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a mount namespace of its own needs root and unshare(1)")
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", str(disk), str(seen_as)]


def count_archived(directory: Path) -> list[str]:
    """The ids in an archive's files (none when there are none)."""
    ids = []
    for path in sorted(directory.glob("*/*/*/*.ndjson.gz")):
        ids += [json.loads(line)["id"] for line in gzip.decompress(path.read_bytes()).splitlines()]
    return ids


class TestReplicas:
    async def test_each_replica_replays_what_it_archived(
        self,
        tmp_path: Path,
        platform: RunningFake,
        processes: list[SidecarProcess],
        database: str,
    ) -> None:
        """Two `run` replicas on PostgreSQL, each archiving to its own disk (the same `dir`,
        as on two machines), half the events archived by each: the platform wiped after
        delivery, `replay` on each replica's machine queues what that replica archived, and
        the replicas send every event again, ids and bodies unchanged, without a restart."""
        archive, disk_b = tmp_path / "archive", tmp_path / "disk-b"
        wrap = own_disk(disk_b, archive)
        archive.mkdir(mode=0o700)
        disk_b.mkdir(mode=0o700)
        await empty(database)
        replicas = []
        for name, under in (("a", []), ("b", wrap)):
            port = free_port()
            config = config_for(tmp_path, platform, port, url=database, name=name)
            process = SidecarProcess(config, port, tmp_path / f"{name}.log", wrap=under)
            processes.append(process)
            replicas.append((process, config))
            await process.wait_ready()
            if name == "a":
                # The first half archived by A alone, the second by B while A is frozen: each
                # disk holds half.
                first = [make_event(eventTime=at(1800)) for _ in range(20)]
                await post(process, first)
                await platform.fake.wait_for({e["id"] for e in first})
                await archived(config, 20)
                process.proc.send_signal(signal.SIGSTOP)
        a, b = replicas[0][0], replicas[1][0]
        second = [make_event(eventTime=at(1800)) for _ in range(20)]
        await post(b, second)
        await archived(replicas[1][1], 40)
        a.proc.send_signal(signal.SIGCONT)
        events = first + second
        ids = {e["id"] for e in events}
        await platform.fake.wait_for(ids)
        assert sorted(count_archived(archive)) == sorted(e["id"] for e in first)
        assert sorted(count_archived(disk_b)) == sorted(e["id"] for e in second)
        platform.fake.wipe()

        queued = 0
        for (_, config), under in ((replicas[0], []), (replicas[1], wrap)):
            code, out, err = await cli("replay", "--since", "2h", "-c", str(config), wrap=under)
            assert code == 0, err
            queued += int(out.splitlines()[1].split()[1])
        assert queued == 40
        await platform.fake.wait_for(ids, timeout=20)
        assert {i: platform.fake.received[i] for i in ids} == {e["id"]: e for e in events}
        for process, _ in replicas:
            assert await process.terminate() == 0


class TestWhatIsReplayed:
    async def test_one_learner_a_range_one_destination(
        self,
        tmp_path: Path,
        platform: RunningFake,
        district: RunningFake,
        processes: list[SidecarProcess],
    ) -> None:
        """`--actor` takes one learner's events (the actor a string, or its `id`), `--until`
        bounds the range, `--to` sends to that destination alone ([upstream] is left alone);
        events delivered moments ago (within the dedupe window) are not refused as
        duplicates."""
        port = free_port()
        config = config_for(tmp_path, platform, port, district)
        process = await running(tmp_path, processes, config, port)
        person = {"id": LEARNER, "type": "Person"}
        mine = [
            make_event(actor=LEARNER, eventTime=at(3 * 3600)),  # before --since
            make_event(actor=person, eventTime=at(2 * 3600)),
            make_event(actor=LEARNER, eventTime=at(90 * 60)),
            make_event(actor=LEARNER, eventTime=at(10 * 60)),  # after --until
        ]
        others = [make_event(actor=OTHER, eventTime=at(2 * 3600)) for _ in range(3)]
        await post(process, mine + others)
        every = {e["id"] for e in mine + others}
        await platform.fake.wait_for(every)
        await district.fake.wait_for(every)
        await archived(config, 7)
        district.fake.wipe()
        upstream_envelopes = platform.fake.envelopes

        code, out, err = await cli(
            "replay",
            "--since",
            "150m",
            "--until",
            "30m",
            "--actor",
            LEARNER,
            "--to",
            "district-lrs",
            "-c",
            str(config),
        )
        assert code == 0, err
        assert out.splitlines()[1:3] == [
            "queued 2 events again: district-lrs 2",
            "skipped 5: 2 with eventTime outside the range, 3 of another actor, 0 archived "
            "twice, 0 unreadable",
        ]
        wanted = {mine[1]["id"], mine[2]["id"]}
        await district.fake.wait_for(wanted, timeout=20)
        found = await journey(process, mine[1]["id"])
        assert [(m["what"], m["destination"]) for m in found["marks"]] == [
            ("replayed", "district-lrs")
        ]
        assert (await journey(process, mine[0]["id"])).get("marks") is None
        assert await process.terminate() == 0
        assert set(district.fake.received) == wanted
        assert platform.fake.envelopes == upstream_envelopes

    async def test_nothing_in_the_range_is_zero_events(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """A range that holds nothing queues nothing, says so, and exits 0."""
        port = free_port()
        config = config_for(tmp_path, platform, port)
        process = await running(tmp_path, processes, config, port)
        await post(process, [make_event(eventTime=at(3 * 3600))])
        await archived(config, 1)
        code, out, _ = await cli("replay", "--since", "1h", "-c", str(config))
        assert code == 0
        assert out.splitlines()[1] == "queued 0 events again: upstream 0"
        assert await process.terminate() == 0

    async def test_archived_twice_is_queued_once_and_unreadable_lines_are_skipped(
        self, tmp_path: Path, platform: RunningFake
    ) -> None:
        """An event the archive holds twice (an append written again after a crash) is
        queued once; a line that is not an event with an id and an eventTime is skipped and
        counted; every one is committed when the command returns (no `run` here)."""
        config = config_for(tmp_path, platform, free_port())
        kept = [make_event(eventTime=at(600)) for _ in range(3)]
        bodies = [json.dumps(e).encode() for e in kept]
        broken = [
            b"not json",
            b'{"id": "urn:uuid:x"}',
            b'{"id": 7, "eventTime": "' + at(60).encode() + b'"}',
        ]
        async with Archive(tmp_path / "archive", keep_days=0) as archive:
            await archive.append([ArchivedEvent(time.time(), b) for b in bodies + broken])
            await archive.append([ArchivedEvent(time.time(), bodies[0])])
        settings = OutboxSettings(path=str(tmp_path / "outbox.db"))
        async with sqlite_outbox(settings):
            pass  # an outbox, as the first `run` leaves it
        code, out, err = await cli("replay", "--since", "1h", "-c", str(config))
        assert code == 0, err
        assert out.splitlines()[1:3] == [
            "queued 3 events again: upstream 3",
            "skipped 4: 0 with eventTime outside the range, 0 of another actor, 1 archived "
            "twice, 3 unreadable",
        ]
        async with sqlite_outbox(settings) as outbox:
            batch = await outbox.claim_batch(10, 1_000_000)
        assert [(e.id, e.body) for e in batch.events] == list(
            zip([e["id"] for e in kept], bodies, strict=True)
        )

    async def test_files_of_hours_long_before_since_are_not_read(
        self, tmp_path: Path, platform: RunningFake
    ) -> None:
        """The files of hours that ended more than a day before `--since` are not read (an
        event is received at or after its eventTime, give or take an app's clock): an event
        received three days ago is not found, whatever its eventTime; one received 25 hours
        ago and stamped an hour ahead of its receipt is."""
        config = config_for(tmp_path, platform, free_port())
        now = time.time()
        old, recent = make_event(eventTime=at(60)), make_event(eventTime=at(24 * 3600 - 120))
        async with Archive(tmp_path / "archive", keep_days=0) as archive:
            await archive.append([ArchivedEvent(now - 3 * 86_400, json.dumps(old).encode())])
            await archive.append([ArchivedEvent(now - 25 * 3600, json.dumps(recent).encode())])
        async with sqlite_outbox(OutboxSettings(path=str(tmp_path / "outbox.db"))):
            pass
        code, out, err = await cli("replay", "--since", "24h", "-c", str(config))
        assert code == 0, err
        assert out.splitlines()[0].startswith("read 1 events from 1 file(s)")
        assert out.splitlines()[1] == "queued 1 events again: upstream 1"


class TestBadInput:
    @pytest.mark.parametrize(
        ("args", "archives", "message"),
        [
            ((), ("archive",), "the following arguments are required: --since"),
            (("--since", "yesterday"), ("archive",), "--since: 'yesterday' is not a time"),
            (("--since", "2h", "--until", "3h"), ("archive",), "--until 3h is before --since 2h"),
            (("--since", "2h"), (), "has none (a [[destinations]] entry with kind"),
            (("--since", "2h", "--to", "nowhere"), ("archive",), "--to nowhere: not a destination"),
            (("--since", "2h", "--to", "archive"), ("archive",), "--to archive: an archive"),
            (("--since", "2h"), ("a1", "a2"), "several archive destinations (a1, a2): name one"),
            (("--since", "2h", "--from", "a3"), ("a1", "a2"), "--from a3: not an archive"),
        ],
    )
    async def test_refused_with_a_clear_message_and_nothing_changed(
        self,
        tmp_path: Path,
        platform: RunningFake,
        args: tuple[str, ...],
        archives: tuple[str, ...],
        message: str,
    ) -> None:
        """Each is exit 2 with a message saying what is wrong, before the outbox is even
        opened."""
        config = config_for(tmp_path, platform, free_port(), archives=archives)
        for name in archives:
            (tmp_path / name).mkdir()
        code, out, err = await cli("replay", *args, "-c", str(config))
        assert (code, out) == (2, "")
        assert message in err
        assert not (tmp_path / "outbox.db").exists()

    async def test_a_destination_no_run_has_started_is_refused(
        self,
        tmp_path: Path,
        platform: RunningFake,
        district: RunningFake,
        processes: list[SidecarProcess],
    ) -> None:
        """`--to` a configured destination that no `run` has started yet (it has no place in
        the outbox) is exit 2, nothing queued."""
        port = free_port()
        config = config_for(tmp_path, platform, port)
        process = await running(tmp_path, processes, config, port)
        await post(process, [make_event(eventTime=at(60))])
        await archived(config, 1)
        assert await process.terminate() == 0
        config = config_for(tmp_path, platform, port, district)
        code, out, err = await cli(
            "replay", "--since", "1h", "--to", "district-lrs", "-c", str(config)
        )
        assert (code, out) == (2, "")
        assert "--to district-lrs: no `run` has started with this destination yet" in err
        code, out, _ = await cli("outbox", "stats", "--json", "-c", str(config))
        assert json.loads(out)["events"] == 0
