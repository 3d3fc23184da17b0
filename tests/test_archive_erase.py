"""Erasing a learner's lines from an archive's files (delivery/archive_erase.py,
docs/archive.md): the other lines kept in order, files rewritten whole, coordinated with the
archive's appends and with the repair after a crash. Real parts: files on disk, read back by
the real `gzip -dc`, appends in threads as `run` makes them."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from caliper_sidecar.delivery.archive import APPENDING, LOCK, Archive, ArchivedEvent, hour_file
from caliper_sidecar.delivery.archive_erase import erase_from_archive

from .conftest import make_event

LEARNER = "https://sis.example.edu/users/learner-QX7-erase-me"
CANARY = "ZEBRA-CANARY-4471"
HOUR = 1_765_000_000.0  # some hour; a second file one hour later


def learner(as_object: bool = True) -> dict[str, Any]:
    actor: Any = {"id": LEARNER, "type": "Person"} if as_object else LEARNER
    return make_event(actor=actor, extensions={"note": CANARY})


def other() -> dict[str, Any]:
    return make_event(actor={"id": "https://sis.example.edu/users/someone-else", "type": "Person"})


def archived(at: float, events: list[dict[str, Any]]) -> list[ArchivedEvent]:
    return [ArchivedEvent(at, json.dumps(e).encode()) for e in events]


def gzip_dc(directory: Path) -> list[dict[str, Any]]:
    """Every line of every hour file, as the real `gzip -dc` reads them (it must not
    complain)."""
    files = sorted(str(p) for p in directory.glob("*/*/*/*.ndjson.gz"))
    if not files:
        return []
    done = subprocess.run(["gzip", "-dc", *files], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.splitlines()]


def traces(directory: Path) -> list[str]:
    """The files under the dir (hidden ones too) that hold the learner's id or canary, raw
    or decompressed."""
    found = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data += gzip.decompress(data)
        if LEARNER.encode() in data or CANARY.encode() in data:
            found.append(path.relative_to(directory).as_posix())
    return found


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


class TestEraseFromArchive:
    async def test_removes_the_learners_lines_and_keeps_the_others_in_order(
        self, tmp_path: Path
    ) -> None:
        """Lines of the learner (actor a string or an object) go from every hour file; the
        others stay in order, readable by gzip -dc; a file left with none is removed."""
        directory = tmp_path / "archive"
        kept = [other(), other(), other()]
        mine = [learner(True), learner(False), learner(True)]
        async with Archive(directory, keep_days=0) as archive:
            await archive.append(archived(HOUR, [kept[0], mine[0]]))
            await archive.append(archived(HOUR, [mine[1], kept[1], kept[2]]))
            await archive.append(archived(HOUR + 3600, [mine[2]]))
            first, second = hour_file(HOUR), hour_file(HOUR + 3600)
            assert traces(directory) == [first, second]

            erased = await asyncio.to_thread(erase_from_archive, directory, LEARNER)
            assert erased.lines == {first: 2, second: 1}
            assert erased.ids == {e["id"] for e in mine}
            assert gzip_dc(directory) == kept
            assert not (directory / second).exists()
            assert traces(directory) == []
            assert await asyncio.to_thread(erase_from_archive, directory, LEARNER) == type(erased)()

    async def test_a_dry_run_changes_no_byte(self, tmp_path: Path) -> None:
        """A dry run counts the same lines and leaves every file byte for byte."""
        directory = tmp_path / "archive"
        async with Archive(directory, keep_days=0) as archive:
            await archive.append(archived(HOUR, [other(), learner(), learner(False)]))
            before = snapshot(directory)
            dry = await asyncio.to_thread(erase_from_archive, directory, LEARNER, True)
            assert dry.lines == {hour_file(HOUR): 2}
            assert snapshot(directory) == before

    async def test_a_repair_after_a_crash_reads_a_rewritten_file_from_its_start(
        self, tmp_path: Path
    ) -> None:
        """A file listed in `.appending` at its old size, rewritten smaller, appended to and
        torn by a crash, is cut back to its last whole member, not at the stale size (which
        falls inside the member appended after the rewrite, and would cut it mid-way)."""
        directory = tmp_path / "archive"
        kept = [other(), other()]
        async with Archive(directory, keep_days=0) as archive:
            await archive.append(archived(HOUR, [learner(), kept[0]]))
        name = hour_file(HOUR)
        crashed = await Archive(directory, keep_days=0).open()  # lists the file at its size
        await crashed.append(archived(HOUR, kept[1:]))
        await asyncio.to_thread(erase_from_archive, directory, LEARNER)
        await crashed.append(archived(HOUR, [other() for _ in range(40)]))
        path = directory / name
        with path.open("r+b") as f:  # the crash tore the last member
            f.truncate(path.stat().st_size - 5)
        assert (directory / APPENDING).read_text().splitlines()[-1] == f"0 {name}"

        await Archive(directory, keep_days=0).open()  # the next start repairs
        assert gzip_dc(directory) == kept

    async def test_appends_under_way_are_never_lost_nor_the_learner_kept(
        self, tmp_path: Path
    ) -> None:
        """Erasing while appends run (the dir's lock): every other line appended is there
        once at the end, and no line of the learner's is, after one last erase."""
        directory = tmp_path / "archive"
        archive = await Archive(directory, keep_days=0).open()
        appended: list[dict[str, Any]] = []
        stop = threading.Event()

        def append_for_a_while() -> None:
            while not stop.is_set():
                batch = [other(), learner(), other()]
                asyncio.run(archive.append(archived(HOUR, batch)))
                appended.extend([batch[0], batch[2]])

        writer = threading.Thread(target=append_for_a_while)
        writer.start()
        try:
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                await asyncio.to_thread(erase_from_archive, directory, LEARNER)
        finally:
            stop.set()
            writer.join()
        await asyncio.to_thread(erase_from_archive, directory, LEARNER)
        await archive.close()
        lines = gzip_dc(directory)
        assert [e["id"] for e in lines] == [e["id"] for e in appended]
        assert traces(directory) == []

    async def test_files_keep_their_owner(self, tmp_path: Path) -> None:
        """Run as root (`sudo caliper-sidecar erase`), the rewrite keeps each file's owner and
        gives a `.lock` it creates to the dir's owner: `run`, as the service's user, still
        appends."""
        if os.geteuid() != 0:
            pytest.skip("only root can give files to another user")
        directory = tmp_path / "archive"
        async with Archive(directory, keep_days=0) as archive:
            await archive.append(archived(HOUR, [other(), learner()]))
        (directory / LOCK).unlink()
        service = 65534  # nobody
        for path in [directory, *directory.rglob("*")]:
            os.chown(path, service, service)
        await asyncio.to_thread(erase_from_archive, directory, LEARNER)
        for path in [directory / hour_file(HOUR), directory / LOCK]:
            assert (path.stat().st_uid, path.stat().st_gid) == (service, service), path.name
