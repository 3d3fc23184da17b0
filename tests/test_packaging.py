"""What a package index and an installer see: one version, the licence, the examples valid."""

from __future__ import annotations

import importlib.metadata
import json
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
