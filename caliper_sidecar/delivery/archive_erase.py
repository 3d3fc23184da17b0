"""Erasing a learner's lines from an `archive` destination's files (archive.py), beside a
running `run` that appends to them.

Each hour file is read whole, under the dir's `.lock` (the archive's appends, repairs and
prunes take it too, so nothing is written to the file meanwhile), and when it holds a line
whose event's actor is the learner it is written anew without those lines: a temporary file
in the same dir (not an hour file's name, so neither readers' globs nor a repair see it),
fsynced, renamed over the old one, the dir fsynced. A reader or an append sees the old file
or the new one, never half of one, and after a power cut the new one is there. A file left
with no line is removed (readers refuse an empty gzip file). A torn last member (an append
that crashed) is left out, as the next start's repair would cut it. Each rewritten file is
then listed as `0 name` in `.appending`, so that a repair after a crash reads it from its
start rather than from a size it had before it shrank (archive.py says why).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from caliper_sidecar.delivery.archive import (
    APPENDING,
    COMPRESS_LEVEL,
    SUFFIX,
    complete_length,
    fsync_dir,
    locked,
)

#: the prefix of a rewrite's temporary file; one left by a crash is removed by the next erase
TEMPORARY: Final = ".erase-"


@dataclass(frozen=True, slots=True)
class ArchiveErasure:
    """What erasing one learner found in an archive's files (and removed, unless a dry run):
    lines by file (relative to the dir), and the ids of their events."""

    lines: dict[str, int] = field(default_factory=dict)
    ids: frozenset[str] = frozenset()

    @property
    def total(self) -> int:
        return sum(self.lines.values())


def actor_of(event: Any) -> str | None:
    """An event's actor id: its `actor` when that is a string, else `actor.id`."""
    if not isinstance(event, dict):
        return None
    actor = event.get("actor")
    if isinstance(actor, dict):
        actor = actor.get("id")
    return actor if isinstance(actor, str) else None


def erase_from_archive(dir: Path, actor: str, dry_run: bool = False) -> ArchiveErasure:
    """Remove every line whose event's actor is `actor` from the hour files under `dir`
    (with `dry_run`, only count them); see the module. OSError when a file cannot be read
    or written (the files done before it stay done)."""
    if not dir.is_dir():
        return ArchiveErasure()
    lines: dict[str, int] = {}
    ids: set[str] = set()
    for path in sorted(dir.glob(f"*/*/*/*{SUFFIX}")):
        name = path.relative_to(dir).as_posix()
        with locked(dir):
            found = _erase_in_file(dir, path, actor, dry_run)
        if found:
            lines[name] = len(found)
            ids.update(found)
    if not dry_run:
        with locked(dir):
            for stale in dir.glob(f"*/*/*/{TEMPORARY}*"):
                stale.unlink(missing_ok=True)
    return ArchiveErasure(lines, frozenset(ids))


def _erase_in_file(dir: Path, path: Path, actor: str, dry_run: bool) -> list[str]:
    """The ids of the learner's lines in one file (ids of events without one: ""), the file
    rewritten without them unless `dry_run`; under the dir's lock."""
    try:
        with path.open("rb") as f:
            whole = complete_length(f)
            f.seek(0)
            data = f.read(whole)
    except FileNotFoundError:
        return []  # pruned meanwhile
    kept: list[bytes] = []
    found: list[str] = []
    for line in gzip.decompress(data).splitlines(keepends=True) if data else []:
        try:
            event = json.loads(line)
        except ValueError:
            kept.append(line)  # not an event: not the learner's to take
            continue
        if actor_of(event) == actor:
            found.append(str(event.get("id", "")))
        else:
            kept.append(line)
    if not found or dry_run:
        return found
    if kept:
        _replace(path, gzip.compress(b"".join(kept), COMPRESS_LEVEL, mtime=0))
    else:
        path.unlink()
        fsync_dir(path.parent)
    _list_for_repair(dir, path.relative_to(dir).as_posix())
    return found


def _replace(path: Path, data: bytes) -> None:
    """Write `data` as the file at `path`: a temporary file beside it, fsynced, renamed over
    it, the dir fsynced; its mode (0600) and its owner kept (`sudo caliper-sidecar erase`:
    `run`, as the service's user, must still append to it)."""
    owner = path.stat()
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=TEMPORARY)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)


def _list_for_repair(dir: Path, name: str) -> None:
    """Add `0 name` to `.appending` when it exists (a `run` has the archive open, or died
    with it open): a repair then reads the rewritten file from its start."""
    try:
        fd = os.open(dir / APPENDING, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # no list: a start checks every file anyway
    try:
        os.write(fd, b"0 %s\n" % name.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
