"""What a package index and an installer see: one version, the licence, the examples valid."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from caliper_sidecar import __version__
from caliper_sidecar.validation import validate_events
from caliper_sidecar.validation.shape import events_of

ROOT = Path(__file__).resolve().parents[1]


def test_one_version_source() -> None:
    """The installed distribution's version is `sidecar.__version__` (pyproject reads it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" in project["dynamic"]
    assert importlib.metadata.version("caliper-sidecar") == __version__


def test_licence_as_setuptools_requires() -> None:
    """An SPDX licence expression and the licence file (PEP 639)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert any(
        c.startswith("Programming Language :: Python :: 3.11") for c in project["classifiers"]
    )


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.json")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    """The README's curl example sends examples/event.json: every example passes validation."""
    events = events_of(json.loads(path.read_text()))
    assert validate_events(events).errors == []


def test_postgres_is_an_extra() -> None:
    """The embedded default needs no PostgreSQL driver: asyncpg comes with the `postgres`
    extra (and the test extra, whose tests use it), never with a plain install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("asyncpg") for d in project["dependencies"])
    assert any(d.startswith("asyncpg") for d in project["optional-dependencies"]["postgres"])
    assert "caliper-sidecar[postgres]" in project["optional-dependencies"]["test"]


def test_the_sdist_holds_the_tests_their_data_and_the_deploy_files(tmp_path: Path) -> None:
    """The sdist builds, and holds what running its tests needs (conftest.py, the recorded
    SDK calls, the Caliper examples the tests are written from) and what deploying needs
    (config/, deploy/, examples/), not only the package."""
    # From a copy of the checkout's files: setuptools would otherwise reuse the file list of
    # an earlier build left in caliper_sidecar.egg-info.
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if not files:
        pytest.skip("not a git checkout: the sdist is built from one")
    source = tmp_path / "source"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})",
        ],
        cwd=source,
        capture_output=True,
        check=True,
        timeout=120,
    )
    (sdist,) = tmp_path.glob("caliper_sidecar-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {n for n in files if n.split("/")[0] in {"tests", "config", "deploy", "examples"}}
    wanted = {n for n in wanted if "__pycache__" not in n and not n.endswith(".pyc")}
    assert wanted <= names, sorted(wanted - names)[:10]
    assert "caliper_sidecar/http/status_page.html" in names
    assert not any(n.endswith((".pyc", ".db")) or "__pycache__" in n for n in names)
