"""One `run` process per outbox file, enforced with an advisory lock on the file itself."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from caliper_sidecar.exceptions import OutboxLocked, OutboxUnusable


class OutboxLock:
    """An exclusive `flock` on the outbox file, held for the life of the process.

    The lock is on the file (its inode), not on a name beside it: a symlink or a hard link to
    the same outbox meets the same lock. `flock` locks are independent of the POSIX locks SQLite
    takes on the same file. The kernel releases it when the process dies, even by SIGKILL, so a
    crash never leaves a stale lock. The holder's pid is written to `<real path>.lock`, for the
    message only. The CLI's inspection commands do not take the lock: they are safe alongside
    `run` because SQLite serializes their writes.
    """

    def __init__(self, outbox_path: str | os.PathLike[str]) -> None:
        self.path = Path(outbox_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Created here when missing, owner-only, as the outbox itself would be.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise OutboxUnusable(
                f"outbox.path {self.path} cannot be used as an outbox: {e.strerror or e}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutboxLocked(
                f"the outbox {self.path} is in use by caliper-sidecar run "
                f"({_named(self.path)}); only one run process may own an outbox file, whatever "
                "name or link it is reached by"
            ) from None
        note = _note(self.path)
        try:
            note.write_text(str(os.getpid()))
            note.chmod(0o600)
        except OSError:
            pass  # the note is a courtesy; the lock is what counts
        self._fd = fd

    @staticmethod
    def holder(outbox_path: str | os.PathLike[str]) -> str | None:
        """Who holds the lock now, as the message names it ("pid N", or "another process");
        None when nobody does (or there is no file)."""
        try:
            fd = os.open(outbox_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _named(outbox_path)
        finally:
            os.close(fd)  # closing drops a shared lock taken here
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutboxLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _note(outbox_path: str | os.PathLike[str]) -> Path:
    """Where the holder's pid is written: beside the real file, whatever link names it."""
    return Path(f"{os.path.realpath(outbox_path)}.lock")


def _named(outbox_path: str | os.PathLike[str]) -> str:
    """The holder as a message names it: "pid N" from the note, or "another process"."""
    try:
        pid = _note(outbox_path).read_text(errors="replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process"
