"""`caliper-sidecar demo`: no config, no network, exit 0 when every sample event arrived."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_delivers_every_sample_event(tmp_path: Path) -> None:
    """The demo runs from an empty directory and reports every event delivered."""
    out = subprocess.run(
        [sys.executable, "-m", "caliper_sidecar", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: every event reached TimeBack" in out.stdout
    assert "dead-lettered               0" in out.stdout
    assert "backing_off" in out.stdout  # the outage was seen, and absorbed
    assert not list(tmp_path.iterdir()), "the demo leaves nothing behind"
