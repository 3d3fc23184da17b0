"""Disks that really fill, for the tests of what a full disk does (root only)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(tmp_path: Path, size: str, otherwise: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "64m") under tmp_path; the test is skipped, naming `otherwise`
    (what covers the case there), where none can be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here; {otherwise}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(path: Path, chunk: int = 1_048_576) -> None:
    """Write until the filesystem refuses: another program filling the disk."""
    with path.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * chunk)
                f.flush()
        except OSError:
            pass
