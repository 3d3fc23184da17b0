"""The OpenAPI document: committed as served, and checked by schemathesis against a live
sidecar (no 5xx; every answer's status, content type and body as documented)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import aiohttp
import pytest

from sidecar import openapi
from sidecar.mock_upstream import RunningFake

from .conftest import SidecarProcess, free_port, write_config

ROOT = Path(__file__).resolve().parents[1]


def test_docs_openapi_is_what_is_served() -> None:
    """docs/openapi.json holds the same bytes as GET /openapi.json (regenerate it with
    `python -m sidecar.openapi > docs/openapi.json`)."""
    assert (ROOT / "docs" / "openapi.json").read_bytes() == openapi.rendered()


def test_every_route_is_documented() -> None:
    from sidecar import admin, drop_in, ops, receiver

    documented = {
        (method.upper(), path)
        for path, item in openapi.document()["paths"].items()
        for method in item
    }
    routes = receiver.routes() + drop_in.routes() + ops.routes() + admin.routes()
    served = {(r.method, r.path) for r in routes}
    assert served == documented


async def test_schemathesis_finds_nothing(
    platform: RunningFake, tmp_path: Path, processes: list[SidecarProcess]
) -> None:
    """A bounded schemathesis run (deterministic, a few examples per operation) against the
    real process: no server error, and every answer conforms to the document."""
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis (the test extra) is not installed")
    port = free_port()
    config = write_config(tmp_path / "c.toml", platform, tmp_path / "outbox.db", port)
    process = SidecarProcess(config, port, tmp_path / "run.log")
    processes.append(process)
    await process.wait_ready()
    async with aiohttp.ClientSession() as http, http.get(f"{process.url}/openapi.json") as r:
        assert r.status == 200
    proc = await asyncio.create_subprocess_exec(
        st,
        "run",
        f"{process.url}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance",
        "--max-examples",
        "8",
        "--generation-deterministic",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-4000:]
    assert '"status":500' not in process.logs()
