"""Files generated from the code (tools/reference.py) are what the code generates now: a key,
a default, a description or an answer body changed without regenerating fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from caliper_sidecar.presets import PLATFORMS, Platform
from caliper_sidecar.tools import reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", list(reference.generated()), ids=str)
def test_generated_file_has_not_drifted(path: Path) -> None:
    """Regenerate with `python -m caliper_sidecar.tools.reference`."""
    assert (ROOT / path).read_bytes() == reference.generated()[path]


def test_the_example_config_describes_every_key() -> None:
    """Every key has a meaning, or choices that say it."""
    text = reference.example_toml()
    for line in text.splitlines():
        if " = " in line and not line.startswith("#"):
            assert "#" in line or line.split(" = ")[0] in _SELF_EXPLAINING, line


#: keys whose name says it all
_SELF_EXPLAINING = {
    "port",
    "client_id",
    "scope",
    "initial_backoff_s",
    "max_backoff_s",
}


def test_the_platform_type_names_every_platform() -> None:
    """`upstream.platform`'s type and the platforms' endpoint paths name the same platforms."""
    assert set(get_args(Platform)) == set(PLATFORMS)


def test_help_prints_help_and_writes_nothing() -> None:
    """`--help` on the tool prints its help; it rewrote both files before. `--check` says
    they are up to date (exit 0), writing nothing."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "config" / "sidecar.example.toml", root / "docs" / "openapi.json"]
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    for args in (["--help"], ["--check"]):
        done = subprocess.run(
            [sys.executable, "-m", "caliper_sidecar.tools.reference", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before
    assert (
        "usage:"
        in subprocess.run(
            [sys.executable, "-m", "caliper_sidecar.tools.reference", "--help"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    )
