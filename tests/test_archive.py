"""The archive's files (docs/archive.md): hour files of one JSON object a line that the real
`gzip -dc` and DuckDB read, repaired after a crash, pruned after `keep_days`, and a clear error
when they cannot be written."""

from __future__ import annotations

import asyncio
import calendar
import collections
import errno
import gzip
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from caliper_sidecar.delivery.archive import (
    APPENDING,
    Archive,
    ArchivedEvent,
    hour_file,
    read_lines,
    received_since,
)
from caliper_sidecar.exceptions import (
    ArchiveUnavailable,
    ArchiveUnusable,
    ConfigError,
    RetryLater,
)
from caliper_sidecar.preflight import check_archive_directory

from .disks import fill_disk, tmpfs

ROOT = Path(__file__).resolve().parents[1]
#: 2026-03-14T09:00:00Z, the start of an hour
BASE = calendar.timegm((2026, 3, 14, 9, 0, 0))
HOUR = 3600
DAY = 86_400

#: appends in a process of its own, which ends without `close`, as a crash would: "batches"
#: appends what stdin holds, then exits at once; "loop" appends until it is killed. Each line
#: it prints is printed after an append returned.
CHILD = """
import asyncio, json, os, sys
from pathlib import Path
from caliper_sidecar.delivery.archive import Archive, ArchivedEvent

async def main() -> None:
    archive = await Archive(Path(sys.argv[1]), keep_days=0).open()
    if sys.argv[2] == "batches":
        for batch in json.load(sys.stdin):
            await archive.append([ArchivedEvent(at, body.encode()) for at, body in batch])
        os._exit(0)
    n, base = int(sys.argv[3]), float(sys.argv[4])
    while True:
        first, batch = n, []
        for _ in range(100):
            body = {"n": n, "pad": os.urandom(400).hex()}
            batch.append(ArchivedEvent(base + (n % 3) * 3600, json.dumps(body).encode()))
            n += 1
        await archive.append(batch)
        os.write(1, b"appended %d %d\\n" % (first, n))  # one write: whole, or not at all

asyncio.run(main())
"""


def event(n: int, at: float, **extra: Any) -> ArchivedEvent:
    return ArchivedEvent(at, json.dumps({"id": f"urn:uuid:{n}", "n": n, **extra}).encode())


def hour_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*/*/*.ndjson.gz") if p.is_file())


def gzip_dc(*files: Path) -> bytes:
    """What the real gzip binary decompresses; it must have nothing to complain of."""
    done = subprocess.run(["gzip", "-dc", *map(str, files)], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert not done.stderr
    return done.stdout


def numbers(root: Path) -> list[int]:
    """The `n` of every archived event, as `gzip -dc` reads them all."""
    files = hour_files(root)
    return [json.loads(line)["n"] for line in gzip_dc(*files).splitlines()] if files else []


def member_ends(path: Path) -> list[int]:
    """Where each gzip member of a file ends."""
    data, ends, offset = path.read_bytes(), [], 0
    while offset < len(data):
        inflater = zlib.decompressobj(wbits=31)
        inflater.decompress(data[offset:])
        assert inflater.eof
        offset = len(data) - len(inflater.unused_data)
        ends.append(offset)
    return ends


async def append_then_die(root: Path, batches: list[list[ArchivedEvent]]) -> None:
    """Append the batches in another process that ends without closing the archive."""
    spec = [[(e.received_at, e.body.decode()) for e in batch] for batch in batches]
    child = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", CHILD, str(root), "batches"),
        stdin=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    await child.communicate(json.dumps(spec).encode())
    assert child.returncode == 0


@pytest.fixture
async def archive(tmp_path: Path) -> AsyncIterator[Archive]:
    async with Archive(tmp_path / "archive", keep_days=0) as archive:
        yield archive


class TestLayout:
    async def test_events_land_in_the_file_of_their_hour_of_receipt(self, archive: Archive) -> None:
        """Each event goes to YYYY/MM/DD/HH.ndjson.gz of the UTC hour it was received in."""
        at = [BASE, BASE + HOUR - 1, BASE + HOUR, BASE + 20 * DAY + 2 * HOUR + 7]
        await archive.append([event(n, t) for n, t in enumerate(at)])
        names = [p.relative_to(archive.dir).as_posix() for p in hour_files(archive.dir)]
        assert names == [
            "2026/03/14/09.ndjson.gz",
            "2026/03/14/10.ndjson.gz",
            "2026/04/03/11.ndjson.gz",
        ]
        assert [numbers_in(archive.dir / name) for name in names] == [[0, 1], [2], [3]]
        assert hour_file(BASE + 20 * DAY + 2 * HOUR + 7) == names[2]

    async def test_each_append_adds_one_member_per_file(self, archive: Archive) -> None:
        """An append of many events writes one gzip member to each hour file it touches."""
        for round_ in range(3):
            await archive.append([event(round_ * 10 + i, BASE + i * 600) for i in range(10)])
        for path in hour_files(archive.dir):
            assert len(member_ends(path)) == 3

    async def test_a_body_with_raw_newlines_is_one_line(self, archive: Archive) -> None:
        """Raw CR and LF (a pretty-printed body) become spaces: one line, the same object."""
        body = b'{\r\n  "id": "urn:uuid:1",\n  "text": "two\\nlines"\n}'
        await archive.append([ArchivedEvent(BASE, body), event(2, BASE)])
        lines = gzip_dc(*hour_files(archive.dir)).split(b"\n")
        assert lines[-1] == b""
        assert len(lines) == 3
        assert json.loads(lines[0]) == json.loads(body)
        assert lines[0] == body.replace(b"\r", b" ").replace(b"\n", b" ")

    async def test_files_and_dirs_are_owner_only(self, tmp_path: Path) -> None:
        """Files are created 0600 and directories 0700: they hold learners' events."""
        root = tmp_path / "made" / "archive"
        async with Archive(root, keep_days=0) as archive:
            await archive.append([event(1, BASE)])
        (path,) = hour_files(root)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE((root / APPENDING).stat().st_mode) == 0o600
        for directory in (root.parent, root, *path.relative_to(root).parents):
            if directory != Path("."):
                mode = (root / directory).stat().st_mode
                assert stat.S_IMODE(mode) == 0o700, directory

    async def test_an_append_after_close_raises(self, tmp_path: Path) -> None:
        """A closed archive refuses appends rather than writing past its lifecycle."""
        archive = await Archive(tmp_path, keep_days=0).open()
        await archive.close()
        with pytest.raises(ArchiveUnavailable, match="closed"):
            await archive.append([event(1, BASE)])


def numbers_in(path: Path) -> list[int]:
    return [json.loads(line)["n"] for line in gzip.decompress(path.read_bytes()).splitlines()]


class TestReaders:
    @pytest.fixture
    async def filled(self, archive: Archive) -> list[ArchivedEvent]:
        """Forty appends over three hours, bodies of several shapes, as the archive holds them."""
        events = []
        for n in range(400):
            extra = {"action": "Completed", "score": n / 7} if n % 2 else {"tags": ["a", n]}
            events.append(event(n, BASE + (n % 3) * HOUR + n, **extra))
        for start in range(0, 400, 10):
            await archive.append(events[start : start + 10])
        return events

    async def test_gzip_dc_reads_every_event_once(
        self, archive: Archive, filled: list[ArchivedEvent]
    ) -> None:
        """The real `gzip -dc` over the files gives each event once, as the same JSON."""
        lines = gzip_dc(*hour_files(archive.dir)).splitlines()
        read = {json.loads(line)["n"]: json.loads(line) for line in lines}
        assert len(lines) == len(filled)
        assert read == {e_n: json.loads(e.body) for e_n, e in enumerate(filled)}

    async def test_duckdb_reads_every_row(
        self, archive: Archive, filled: list[ArchivedEvent]
    ) -> None:
        """DuckDB's read_json over the glob of every hour file returns each event once."""
        glob = f"{archive.dir}/**/*.ndjson.gz"
        with duckdb.connect() as db:
            rows = db.execute(
                f"SELECT n, id FROM read_json('{glob}', format = 'newline_delimited') ORDER BY n"
            ).fetchall()
        assert rows == [(n, f"urn:uuid:{n}") for n in range(len(filled))]

    async def test_read_lines_gives_each_event_as_archived(
        self, archive: Archive, filled: list[ArchivedEvent]
    ) -> None:
        """`read_lines` over the hour files gives every line, bodies as archived, in the order
        appended within each file."""
        lines = [line for name in hour_files(archive.dir) for line in read_lines(name)]
        assert sorted(lines) == sorted(e.body for e in filled)
        first_hour = [e.body for e in filled if e.received_at < BASE + HOUR]
        assert list(read_lines(hour_files(archive.dir)[0])) == first_hour

    async def test_read_lines_stops_at_a_member_not_complete(self, archive: Archive) -> None:
        """A member being appended now (a running `run`), or torn, is not read: only the
        complete members before it are, every one of their lines."""
        await archive.append([event(0, BASE), event(1, BASE + 1)])
        (path,) = hour_files(archive.dir)
        whole = path.read_bytes()
        member = gzip.compress(b'{"id": "urn:uuid:2"}\n', mtime=0)
        for cut in (1, 10, len(member) - 1):
            path.write_bytes(whole + member[:cut])
            assert [json.loads(line)["n"] for line in read_lines(path)] == [0, 1]
        path.write_bytes(whole + member)
        assert len(list(read_lines(path))) == 3

    async def test_received_since_skips_the_hours_before(self, archive: Archive) -> None:
        """The files whose hour ended at or before a time are left out; the one it falls in
        and the later ones are kept, oldest first."""
        await archive.append([event(n, BASE + n * HOUR) for n in range(4)])
        assert received_since(archive.dir, BASE + HOUR + 1800) == [
            "2026/03/14/10.ndjson.gz",
            "2026/03/14/11.ndjson.gz",
            "2026/03/14/12.ndjson.gz",
        ]
        assert received_since(archive.dir, BASE + 4 * HOUR) == []


class TestRepair:
    async def three_appends(self, root: Path) -> tuple[Path, list[int]]:
        """Three appends to one hour file by a process that then dies; the file and its
        members' ends."""
        await append_then_die(root, [[event(n, BASE + n)] for n in range(3)])
        (path,) = hour_files(root)
        return path, member_ends(path)

    @pytest.mark.parametrize("keep", [1, 9, 10, "half", -8, -4, -1])
    async def test_a_torn_last_member_is_cut_back(self, tmp_path: Path, keep: int | str) -> None:
        """The last member cut anywhere (header, data, trailer) is cut back to the one before,
        the earlier appends intact, and the next append lands after them."""
        root = tmp_path / "archive"
        path, ends = await self.three_appends(root)
        last = ends[-1] - ends[-2]
        kept = last // 2 if keep == "half" else int(keep) % last
        os.truncate(path, ends[-2] + kept)
        async with Archive(root, keep_days=0) as archive:
            assert path.stat().st_size == ends[-2]
            assert numbers(root) == [0, 1]
            await archive.append([event(3, BASE + 3)])
        assert numbers(root) == [0, 1, 3]

    @pytest.mark.parametrize(
        "tail",
        [b"not gzip at all\n", b"\0" * 4096, b"\x1f\x8b\x08\x00", gzip.compress(b"x\n")[:-3]],
        ids=["garbage", "zeros", "a-header-alone", "a-member-without-its-end"],
    )
    async def test_what_follows_the_last_whole_member_is_cut(
        self, tmp_path: Path, tail: bytes
    ) -> None:
        """Garbage, zeros (a power cut's extended file) or a partial member are cut away."""
        root = tmp_path / "archive"
        path, ends = await self.three_appends(root)
        with path.open("ab") as f:
            f.write(tail)
        async with Archive(root, keep_days=0):
            assert path.stat().st_size == ends[-1]
        assert numbers(root) == [0, 1, 2]

    @pytest.mark.parametrize("keep", [0, 5])
    async def test_a_file_with_no_whole_member_is_removed(self, tmp_path: Path, keep: int) -> None:
        """A file left empty or with only a torn member goes (readers refuse an empty gzip)."""
        root = tmp_path / "archive"
        await append_then_die(root, [[event(1, BASE)], [event(2, BASE + HOUR)]])
        os.truncate(root / hour_file(BASE + HOUR), keep)
        async with Archive(root, keep_days=0):
            assert [p.name for p in hour_files(root)] == ["09.ndjson.gz"]
        assert numbers(root) == [1]

    async def test_the_cut_is_logged_by_file_and_bytes_not_content(self, tmp_path: Path) -> None:
        """The log names the file and the bytes cut; nothing of the events."""
        root = tmp_path / "archive"
        secret = "Ada-Lovelace-scored-97"
        await append_then_die(root, [[event(1, BASE, learner=secret)]] * 2)
        path = root / hour_file(BASE)
        ends = member_ends(path)
        os.truncate(path, ends[-1] - 5)
        with capture_logs() as logs:
            archive = await Archive(root, keep_days=0).open()
        await archive.close()
        (cut,) = [entry for entry in logs if entry["event"] == "archive_tail_cut"]
        assert cut == {
            "event": "archive_tail_cut",
            "log_level": "warning",
            "file": hour_file(BASE),
            "bytes_cut": ends[-1] - 5 - ends[-2],
            "removed": False,
        }
        assert secret not in repr(logs)

    async def test_a_file_of_an_old_hour_is_repaired_too(self, tmp_path: Path) -> None:
        """A backlog's append to an old hour's file, torn, is repaired like the newest."""
        root = tmp_path / "archive"
        async with Archive(root, keep_days=0) as archive:
            await archive.append([event(1, BASE), event(2, BASE + 5 * DAY)])
        await append_then_die(root, [[event(3, BASE + 10)], [event(4, BASE + 5 * DAY + 1)]])
        old = root / hour_file(BASE)
        os.truncate(old, old.stat().st_size - 1)
        async with Archive(root, keep_days=0):
            pass
        assert sorted(numbers(root)) == [1, 2, 4]

    async def test_without_the_list_every_file_is_checked(self, tmp_path: Path) -> None:
        """When `.appending` is gone (removed by hand), the start reads every file."""
        root = tmp_path / "archive"
        async with Archive(root, keep_days=0) as archive:
            await archive.append([event(1, BASE), event(2, BASE + DAY)])
            await archive.append([event(3, BASE)])
        old = root / hour_file(BASE)
        os.truncate(old, old.stat().st_size - 3)
        (root / APPENDING).unlink()
        async with Archive(root, keep_days=0):
            pass
        assert sorted(numbers(root)) == [1, 2]

    async def test_a_clean_close_leaves_no_file_to_check(self, tmp_path: Path) -> None:
        """After `close` every file is whole: the list of files to check is empty."""
        async with Archive(tmp_path, keep_days=0) as archive:
            await archive.append([event(1, BASE), event(2, BASE + DAY)])
            assert (tmp_path / APPENDING).read_bytes().count(b"\n") == 2
        assert (tmp_path / APPENDING).read_bytes() == b""


class TestKill:
    async def test_every_append_that_returned_before_sigkill_is_archived(
        self, tmp_path: Path
    ) -> None:
        """A process appending in a loop, SIGKILLed at random three times: after each start's
        repair, every append it saw return is in the files, no event twice, every line whole."""
        root = tmp_path / "archive"
        acknowledged: set[int] = set()
        for round_ in range(3):
            child = await asyncio.create_subprocess_exec(
                *(sys.executable, "-c", CHILD, str(root), "loop", str(round_ * 10**6), str(BASE)),
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            assert child.stdout is not None
            printed: list[bytes] = []
            while len(printed) < 5:
                line = await asyncio.wait_for(child.stdout.readline(), 30)
                assert line, "the child ended"
                if line.startswith(b"appended"):
                    printed.append(line)
            await asyncio.sleep(random.uniform(0, 0.05))
            child.send_signal(signal.SIGKILL)
            rest, _ = await child.communicate()
            assert child.returncode == -signal.SIGKILL
            for line in [*printed, *rest.split(b"\n")[:-1]]:  # whole lines only
                if line.startswith(b"appended"):
                    _, first, end = line.split()
                    acknowledged.update(range(int(first), int(end)))
            async with Archive(root, keep_days=0):
                archived = numbers(root)
            assert acknowledged <= set(archived)
            assert len(archived) == len(set(archived))


class TestPrune:
    #: half past an hour, ten days after BASE
    NOW = BASE + 10 * DAY + 1800

    async def test_hours_older_than_keep_days_go_and_recent_ones_stay(self, tmp_path: Path) -> None:
        """With keep_days 2, an hour that ended before now - 2 days goes, with its emptied
        directories; the hour holding that instant and later ones stay, whatever the mtimes."""
        cutoff = self.NOW - 2 * DAY
        async with Archive(tmp_path, keep_days=2) as archive:
            at = [BASE, cutoff - 1800 - 1, cutoff - 1800, self.NOW]
            await archive.append([event(n, t) for n, t in enumerate(at)])
            os.utime(tmp_path / hour_file(BASE), (self.NOW, self.NOW))
            os.utime(tmp_path / hour_file(self.NOW), (BASE, BASE))
            assert await archive.prune(self.NOW) == 2
        assert sorted(numbers(tmp_path)) == [2, 3]
        assert not (tmp_path / hour_file(BASE)).parent.exists()
        assert (tmp_path / APPENDING).exists()

    async def test_keep_days_0_keeps_every_file(self, tmp_path: Path) -> None:
        """keep_days 0 keeps the archive for ever."""
        async with Archive(tmp_path, keep_days=0) as archive:
            await archive.append([event(1, BASE - 3000 * DAY), event(2, BASE)])
            assert await archive.prune(self.NOW) == 0
        assert sorted(numbers(tmp_path)) == [1, 2]

    async def test_files_not_of_the_layout_are_left(self, tmp_path: Path) -> None:
        """Prune removes hour files and empty directories only; an operator's notes stay."""
        notes = tmp_path / "2026" / "03" / "14" / "notes.txt"
        async with Archive(tmp_path, keep_days=1) as archive:
            await archive.append([event(1, BASE)])
            notes.write_text("kept")
            assert await archive.prune(self.NOW) == 1
        assert notes.read_text() == "kept"
        assert hour_files(tmp_path) == []


class TestUnwritable:
    def test_a_dir_under_a_regular_file_is_refused_naming_it(self, tmp_path: Path) -> None:
        """A dir that cannot be created (a regular file in its path: even root cannot) is a
        ConfigError, exit 2, naming the dir."""
        (tmp_path / "file").write_text("")
        wanted = tmp_path / "file" / "archive"
        with pytest.raises(ArchiveUnusable, match=f"archive dir {wanted} cannot be created"):
            check_archive_directory(wanted)
        assert issubclass(ArchiveUnusable, ConfigError)

    def test_a_dir_that_is_a_file_is_refused(self, tmp_path: Path) -> None:
        """A dir that is a regular file is refused, naming it."""
        (tmp_path / "archive").write_text("")
        with pytest.raises(ArchiveUnusable, match="is not a directory"):
            check_archive_directory(tmp_path / "archive")

    async def test_open_refuses_it_too(self, tmp_path: Path) -> None:
        """Opening such an archive raises the same error, naming the dir."""
        (tmp_path / "file").write_text("")
        with pytest.raises(ArchiveUnusable, match=str(tmp_path / "file" / "archive")):
            await Archive(tmp_path / "file" / "archive", keep_days=0).open()

    @pytest.mark.skipif(
        os.geteuid() == 0,
        reason="root writes through permission bits, so a 0500 dir cannot refuse it; the "
        "regular-file cases cover root",
    )
    def test_a_read_only_dir_is_refused(self, tmp_path: Path) -> None:
        """A dir this user cannot write is refused, naming it."""
        tmp_path.chmod(0o500)
        try:
            with pytest.raises(ArchiveUnusable, match=str(tmp_path)):
                check_archive_directory(tmp_path)
        finally:
            tmp_path.chmod(0o700)

    async def test_a_failed_append_leaves_nothing_of_itself(self, tmp_path: Path) -> None:
        """An append that fails on its last file raises ArchiveUnavailable (retried with
        backoff) and cuts back what it wrote before: a retry then archives each event once."""
        blocked = tmp_path / hour_file(BASE + DAY)
        async with Archive(tmp_path, keep_days=0) as archive:
            await archive.append([event(1, BASE)])
            blocked.mkdir(parents=True)  # a directory where the hour file must go: EISDIR
            batch = [event(2, BASE), event(3, BASE + HOUR), event(4, BASE + DAY)]
            with pytest.raises(ArchiveUnavailable, match=hour_file(BASE + DAY)) as raised:
                await archive.append(batch)
            assert isinstance(raised.value, RetryLater)
            assert raised.value.errno == errno.EISDIR
            assert numbers(tmp_path) == [1]
            assert not (tmp_path / hour_file(BASE + HOUR)).exists()
            blocked.rmdir()
            await archive.append(batch)
        assert sorted(numbers(tmp_path)) == [1, 2, 3, 4]

    async def test_a_full_disk_is_a_clear_error(self, small_disk: Path) -> None:
        """On a full disk the append raises ArchiveUnavailable saying so, cuts back, and
        succeeds once there is room again."""
        filler = small_disk / "filler"
        async with Archive(small_disk / "archive", keep_days=0) as archive:
            await archive.append([event(1, BASE)])
            fill_disk(filler, 65_536)
            big = [event(n, BASE, pad=os.urandom(2000).hex()) for n in range(2, 200)]
            with pytest.raises(ArchiveUnavailable, match="disk is full") as raised:
                await archive.append(big)
            assert raised.value.errno == errno.ENOSPC
            assert numbers(small_disk / "archive") == [1]
            filler.unlink()
            await archive.append(big)
        assert numbers(small_disk / "archive") == list(range(1, 200))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a filesystem that really fills (root only; skipped elsewhere)."""
    with tmpfs(tmp_path, "2m", "test_a_failed_append_leaves_nothing_of_itself") as mount:
        yield mount


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
events_at = st.tuples(
    st.integers(min_value=0, max_value=3 * HOUR + 59),  # seconds after BASE: four hours
    st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    st.booleans(),  # pretty-printed, with raw newlines
)


class TestProperties:
    @settings(max_examples=40, deadline=None)
    @given(batches=st.lists(st.lists(events_at, max_size=6), min_size=1, max_size=4))
    async def test_reading_back_gives_the_bodies_in_order_per_file(
        self, batches: list[list[tuple[int, dict[str, Any], bool]]]
    ) -> None:
        """Random batches over random hours: each file reads back as exactly its bodies, one
        a line, in the order appended."""
        expected: dict[str, list[bytes]] = collections.defaultdict(list)
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            async with Archive(root, keep_days=0) as archive:
                for batch in batches:
                    events = []
                    for offset, value, pretty in batch:
                        body = json.dumps(value, indent=2 if pretty else None, ensure_ascii=False)
                        events.append(ArchivedEvent(BASE + offset, body.encode()))
                        expected[hour_file(BASE + offset)].append(body.encode())
                    await archive.append(events)
            read = {
                p.relative_to(root).as_posix(): gzip.decompress(p.read_bytes()).split(b"\n")
                for p in hour_files(root)
            }
        assert set(read) == set(expected)
        for name, bodies in expected.items():
            lines = read[name]
            assert lines.pop() == b""
            assert lines == [b.replace(b"\r", b" ").replace(b"\n", b" ") for b in bodies]
            assert [json.loads(line) for line in lines] == [json.loads(b) for b in bodies]
