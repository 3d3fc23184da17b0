"""The `archive` destination's files: every accepted event as received, one JSON object a line,
in gzip files by hour of receipt, `YYYY/MM/DD/HH.ndjson.gz` (UTC) under the archive's dir, read
by `gzip -dc` and by DuckDB's `read_json` (docs/archive.md).

Each append writes one whole gzip member per file and fsyncs it before it returns: readers take
a file of concatenated members as one stream, and a crash can tear only the last member, which
the next `open` cuts back to the end of the last complete, CRC-checked one. Files are only
appended to, cut back (on repair, or when an append fails), and removed by `prune`.

Which files `open` checks is kept in `.appending` beside them: a file is named there, with its
size, and that is fsynced before the file's first write; the list is emptied on close and
started anew hourly. So a start after a crash reads what was written since, not the whole
archive; without the list (a first start, an operator removed it) every file is read.

`caliper-sidecar erase` rewrites files while `run` appends to them (archive_erase.py): a file
then shrinks, and is another file (a new inode renamed over the old). Both sides take an
exclusive `flock` on `.lock` in the dir, the archive for each append, repair and prune, the
eraser for each file it rewrites: an append never meets a file half rewritten, and a rewrite
never loses a member appended meanwhile. Two sizes would then be stale, and neither may act:
`.appending`'s (repair would start reading inside a member and cut a whole file short), so
the eraser adds a line `0 name` for each file it rewrote, and repair starts from the least
size listed; and the size a failed append must cut a file back to, so that cut is made only
on the file it was written to (same inode), never on the rewritten one (a larger size would
pad it with zeros; the eraser already left out the torn member).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import errno
import fcntl
import gzip
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final

import structlog

from caliper_sidecar.exceptions import ArchiveUnavailable, ArchiveUnusable
from caliper_sidecar.preflight import check_archive_directory

log = structlog.get_logger("sidecar.delivery.archive")

SUFFIX: Final = ".ndjson.gz"
#: the files that may be torn, each after the size it had when it was first written to
APPENDING: Final = ".appending"
#: flocked by each append, repair and prune, and by `erase` for each file it rewrites
LOCK: Final = ".lock"
#: how long `.appending` grows before it is started anew (a start after a crash reads the
#: members written since, so this bounds the work of a repair)
APPENDING_SPAN_S: Final = 3600.0
#: gzip's own default: level 9 takes about three times as long for a few percent
COMPRESS_LEVEL: Final = 6
_HOUR_FILE: Final = re.compile(r"(\d{4})/(\d{2})/(\d{2})/(\d{2})\.ndjson\.gz")
#: days, then months, then years: the directories `prune` removes when they are empty
_LAYOUT_DIRS: Final = (
    "[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]",
    "[0-9][0-9][0-9][0-9]/[0-9][0-9]",
    "[0-9][0-9][0-9][0-9]",
)
_NEWLINES_TO_SPACES: Final = bytes.maketrans(b"\r\n", b"  ")
_READ_CHUNK: Final = 1 << 16
_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True, slots=True)
class ArchivedEvent:
    """An event to archive: when the sidecar received it (seconds since the epoch) and its
    JSON exactly as stored."""

    received_at: float
    body: bytes


def hour_file(received_at: float) -> str:
    """The file, relative to the archive's dir, of events received at that time (UTC)."""
    t = time.gmtime(received_at)
    return f"{t.tm_year:04d}/{t.tm_mon:02d}/{t.tm_mday:02d}/{t.tm_hour:02d}{SUFFIX}"


def archive_line(body: bytes) -> bytes:
    """The event as one line. A raw CR or LF in valid JSON can only be whitespace (inside
    strings they are escaped), so spaces in their place keep the same object."""
    return body.translate(_NEWLINES_TO_SPACES) + b"\n"


def complete_length(f: BinaryIO, start: int = 0) -> int:
    """Where the last complete, CRC-checked gzip member ends, reading `f` from `start` (a
    member's beginning); `start` itself when none is."""
    f.seek(start)
    good = pos = start
    inflater: zlib._Decompress | None = None
    pending = b""  # always ends at `pos` in the file
    while True:
        if not pending:
            pending = f.read(_READ_CHUNK)
            if not pending:
                return good  # the member under way, if any, is incomplete
            pos += len(pending)
        if inflater is None:
            inflater = zlib.decompressobj(wbits=31)  # one gzip member, its CRC and length checked
        try:
            inflater.decompress(pending)
        except zlib.error:
            return good  # garbage, zeros, or a member that does not check
        if inflater.eof:
            good = pos - len(inflater.unused_data)
            pending, inflater = inflater.unused_data, None
        else:
            pending = b""


def repair(path: Path, start: int = 0) -> tuple[int, int]:
    """Cut a file back to the end of its last complete member, read from `start` (a member's
    beginning; 0 when the file is shorter), and remove it when none is left, as readers refuse
    an empty gzip file; its size before, and the bytes kept (0: removed)."""
    with path.open("r+b") as f:
        size = os.fstat(f.fileno()).st_size
        end = complete_length(f, start if start <= size else 0)
        if 0 < end < size:
            f.truncate(end)
            os.fsync(f.fileno())
    if not end:
        path.unlink()
        fsync_dir(path.parent)
    return size, end


def hour_files(dir: Path) -> list[str]:
    """The hour files under `dir`, relative to it, oldest hour first."""
    files = (p for p in dir.glob(f"*/*/*/*{SUFFIX}") if p.is_file())
    names = (p.relative_to(dir).as_posix() for p in files)
    return sorted(name for name in names if _HOUR_FILE.fullmatch(name))


def received_since(dir: Path, since: float) -> list[str]:
    """The hour files that may hold events received at or after `since`: those whose hour
    ends after it, oldest first."""
    return [name for name in hour_files(dir) if _hour_start(name) + 3600 > since]


def read_lines(path: Path) -> Iterator[bytes]:
    """The lines of one hour file (events' JSON, without the newline), in the order they
    were appended, a whole member at a time. Reading stops at a member that is not complete
    and CRC-checked: the one a running `run` is appending now (or a torn one, which its
    next start cuts)."""
    with path.open("rb") as f:
        inflater = zlib.decompressobj(wbits=31)
        member: list[bytes] = []
        while chunk := f.read(_READ_CHUNK):
            while chunk:
                try:
                    member.append(inflater.decompress(chunk))
                except zlib.error:
                    return
                if not inflater.eof:
                    break
                yield from b"".join(member).split(b"\n")[:-1]
                chunk, member = inflater.unused_data, []
                inflater = zlib.decompressobj(wbits=31)


class Archive:
    """The archive's hour files under `dir`, kept `keep_days` days (0: for ever). `open` before
    use (it repairs what a crash tore), `close` after; one process per dir."""

    def __init__(self, dir: Path, keep_days: int) -> None:
        self.dir = dir
        self.keep_days = keep_days
        # a thread lock, not an asyncio one: a cancelled append's thread still holds it
        self._mutex = threading.Lock()
        self._appending: int | None = None  # `.appending`, open while the archive is
        self._listed: set[str] = set()
        self._listed_since = 0.0
        #: files an append failed to cut back, with the size they must return to first and
        #: the inode it was written to (a file `erase` rewrote since is left alone)
        self._cut_back: dict[str, tuple[int, int]] = {}

    async def open(self) -> Archive:
        """Create the dir (0700) when missing and repair the files a crash may have torn;
        ArchiveUnusable, naming the dir, when it cannot be used."""
        try:
            await asyncio.to_thread(self._open)
        except OSError as e:
            raise ArchiveUnusable(f"archive dir {self.dir} cannot be used: {_cause(e)}") from None
        return self

    async def append(self, events: Sequence[ArchivedEvent]) -> None:
        """Write the events, one gzip member per hour file, fsynced before this returns: then
        they are archived. ArchiveUnavailable when they cannot be; what was written of them is
        cut back first, so none counts as archived and a retry adds each once."""
        if events:
            await asyncio.to_thread(self._append, events)

    async def prune(self, now: float | None = None) -> int:
        """Remove the files whose hour ended more than `keep_days` days before `now` (the hour
        in the path, not the file's mtime), then the directories left empty; how many files
        went. Nothing goes when `keep_days` is 0. A file that cannot go is logged and kept."""
        if self.keep_days <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - self.keep_days * 86_400
        return await asyncio.to_thread(self._prune, cutoff)

    async def close(self) -> None:
        """Wait for the append under way, then close: the files are whole, so the list of
        those to check at the next start is emptied. Appends after this raise."""
        await asyncio.to_thread(self._close)

    async def __aenter__(self) -> Archive:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- in a worker thread, under the mutex -----------------------------------------------

    def _open(self) -> None:
        with self._mutex:
            if self._appending is not None:
                return  # opened already
            check_archive_directory(self.dir)
            for changed in _make_dirs(self.dir):
                fsync_dir(changed)
            with locked(self.dir):
                self._repair_and_list()

    def _repair_and_list(self) -> None:
        """Repair what `.appending` names (every file without it), then start it anew."""
        listed = self._read_list()
        if listed is None:
            listed = dict.fromkeys(self._hour_files(), 0)
            if listed:
                log.info("archive_checking_every_file", files=len(listed))
        for name, start in sorted(listed.items()):
            try:
                size, kept = repair(self.dir / name, start)
            except FileNotFoundError:
                continue  # created and cut back, or pruned, before the crash
            if kept < size or not kept:
                log.warning("archive_tail_cut", file=name, bytes_cut=size - kept, removed=not kept)
        path = self.dir / APPENDING
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
            if created:
                fsync_dir(self.dir)
        except OSError:
            os.close(fd)
            raise
        self._appending = fd
        self._listed.clear()
        self._listed_since = time.monotonic()

    def _append(self, events: Sequence[ArchivedEvent]) -> None:
        lines: dict[str, list[bytes]] = {}
        for event in events:
            lines.setdefault(hour_file(event.received_at), []).append(archive_line(event.body))
        members = {
            name: gzip.compress(b"".join(part), COMPRESS_LEVEL, mtime=0)
            for name, part in lines.items()
        }
        with self._mutex:
            if self._appending is None:
                raise ArchiveUnavailable(f"archive dir {self.dir}: closed", self.dir)
            written: list[tuple[str, int, int]] = []
            name = ""
            try:
                lock = _lock(self.dir)
            except OSError as e:
                raise self._unavailable(LOCK, e) from e
            try:
                self._finish_cutting_back()
                changed: set[Path] = set()
                for name in members:
                    changed |= _make_dirs((self.dir / name).parent)
                name = ""
                self._list(sorted(members))
                for name in sorted(members):
                    path = self.dir / name
                    fd, created = _open_for_append(path)
                    try:
                        st = os.fstat(fd)
                        written.append((name, 0 if created else st.st_size, st.st_ino))
                        if created:
                            changed.add(path.parent)
                        _write_all(fd, members[name])
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                name = ""
                for directory in changed:
                    fsync_dir(directory)
            except OSError as e:
                self._cut_back_to(written)
                raise self._unavailable(name, e) from e
            finally:
                os.close(lock)  # and the lock with it

    def _prune(self, cutoff: float) -> int:
        removed = 0
        with self._mutex, locked(self.dir):
            for name in self._hour_files():
                if _hour_start(name) + 3600 > cutoff:
                    continue
                try:
                    (self.dir / name).unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.warning("archive_prune_failed", file=name, error=_cause(e))
            for pattern in _LAYOUT_DIRS:
                for directory in self.dir.glob(pattern):
                    with contextlib.suppress(OSError):  # not empty (or not a dir): kept
                        directory.rmdir()
        if removed:
            log.info("archive_pruned", files=removed, keep_days=self.keep_days)
        return removed

    def _close(self) -> None:
        with self._mutex:
            fd, self._appending = self._appending, None
            if fd is None:
                return
            try:
                with locked(self.dir):
                    self._finish_cutting_back()
                os.ftruncate(fd, 0)
                os.fsync(fd)
            except OSError as e:  # the next start checks the files named there
                log.warning("archive_list_not_emptied", error=_cause(e))
            finally:
                os.close(fd)

    # -- helpers of the above ----------------------------------------------------------------

    def _hour_files(self) -> list[str]:
        return hour_files(self.dir)

    def _read_list(self) -> dict[str, int] | None:
        """`.appending` as {file: size it had}, or None when it is missing or not ours."""
        try:
            data = (self.dir / APPENDING).read_bytes()
        except FileNotFoundError:
            return None
        listed: dict[str, int] = {}
        for line in data.split(b"\n")[:-1]:  # a torn last line's file was not written yet
            size, _, name = line.partition(b" ")
            try:
                text, start = name.decode(), int(size)
            except ValueError:
                return None
            if not _HOUR_FILE.fullmatch(text):
                return None
            listed[text] = min(start, listed.get(text, start))
        return listed

    def _list(self, names: list[str]) -> None:
        """Name in `.appending` the files not named yet, fsynced before they are written."""
        assert self._appending is not None
        new = [name for name in names if name not in self._listed]
        if not new:
            return
        if time.monotonic() - self._listed_since > APPENDING_SPAN_S:
            # every earlier append has returned (they hold the mutex): their files are whole
            os.ftruncate(self._appending, 0)
            self._listed.clear()
            self._listed_since = time.monotonic()
            new = names
        entries = b"".join(b"%d %s\n" % (self._size(name), name.encode()) for name in new)
        _write_all(self._appending, entries)
        os.fsync(self._appending)
        self._listed.update(new)

    def _size(self, name: str) -> int:
        try:
            return (self.dir / name).stat().st_size
        except FileNotFoundError:
            return 0

    def _cut_back_to(self, written: list[tuple[str, int, int]]) -> None:
        """Undo a failed append's writes; a file that cannot be cut now is cut before the
        next append writes anything."""
        for name, size, inode in written:
            self._cut_back[name] = (size, inode)
        try:
            self._finish_cutting_back()
        except OSError as e:
            log.error("archive_cut_back_failed", files=sorted(self._cut_back), error=_cause(e))

    def _finish_cutting_back(self) -> None:
        for name, (size, inode) in sorted(self._cut_back.items()):
            path = self.dir / name
            try:
                if path.stat().st_ino != inode:
                    pass  # rewritten by `erase` since, without the torn member
                elif size:
                    with path.open("r+b") as f:
                        f.truncate(size)
                        os.fsync(f.fileno())
                else:
                    path.unlink()  # readers refuse an empty gzip file
            except FileNotFoundError:
                pass
            del self._cut_back[name]

    def _unavailable(self, name: str, error: OSError) -> ArchiveUnavailable:
        where = f" {name}" if name else ""
        full = " (the disk is full)" if error.errno in _FULL else ""
        return ArchiveUnavailable(
            f"archive dir {self.dir}: cannot write{where}{full}: {_cause(error)}",
            self.dir / name if name else self.dir,
            error.errno,
        )


@contextlib.contextmanager
def locked(dir: Path) -> Iterator[None]:
    """Hold the archive dir's `.lock` exclusively (see the module): the files are not
    written by anyone else meanwhile."""
    fd = _lock(dir)
    try:
        yield
    finally:
        os.close(fd)  # and the lock with it


def _lock(dir: Path) -> int:
    """`.lock` opened and flocked exclusively: closing the fd lets it go. Created by `erase`
    run as root, it is given to the dir's owner, whom `run` runs as (an flock needs only a
    descriptor opened for reading, but opening needs the permission)."""
    fd = os.open(dir / LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        owner, mine = os.stat(dir), os.fstat(fd)
        if (mine.st_uid, mine.st_gid) != (owner.st_uid, owner.st_gid) and os.geteuid() == 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        raise
    return fd


def _hour_start(name: str) -> int:
    match = _HOUR_FILE.fullmatch(name)
    assert match is not None
    year, month, day, hour = (int(part) for part in match.groups())
    return calendar.timegm((year, month, day, hour, 0, 0, 0, 0, 0))


def _make_dirs(path: Path) -> set[Path]:
    """Create `path` and its missing parents, owner-only; the directories whose entries
    changed, to fsync so that the new ones survive a power cut."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    changed = set()
    for directory in reversed(missing):
        os.mkdir(directory, 0o700)
        changed.add(directory.parent)
    return changed


def _open_for_append(path: Path) -> tuple[int, bool]:
    """The file opened to append (created 0600 when missing), and whether it was created."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        return os.open(path, flags), False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file created, renamed or removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cause(error: OSError) -> str:
    """What the system said, with the file it said it of."""
    what = error.strerror or str(error)
    return f"{what}: {error.filename}" if error.filename else what
