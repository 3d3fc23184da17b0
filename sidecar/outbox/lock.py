"""One `run` process per outbox file, enforced with an advisory lock beside it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from ..exceptions import OutboxLocked


class OutboxLock:
    """An exclusive `flock` on `<outbox>.lock`, held for the life of the process.

    The kernel releases it when the process dies, even by SIGKILL, so a crash never leaves a
    stale lock behind. The CLI's inspection commands do not take it: they are safe alongside
    `run` because SQLite serializes their writes.
    """

    def __init__(self, outbox_path: str | os.PathLike[str]) -> None:
        self.path = Path(f"{outbox_path}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutboxLocked(
                f"the outbox {str(self.path)[:-5]} is in use by caliper-sidecar run "
                f"(pid {holder}); only one run process may own an outbox file"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

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
