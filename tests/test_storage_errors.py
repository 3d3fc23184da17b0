"""Storage failures as apps see them (docs/guarantees.md): a `storage_error` and a request id, never
a database's internals; the detail is in the log under that request id. On the real local PostgreSQL
(skipped, saying why, where none answers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import msgspec
import pytest
from structlog.testing import capture_logs

from caliper_sidecar.app import start
from caliper_sidecar.outbox.postgres.schema import SCHEMA
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import make_event, settings_for
from .outboxes import empty, fresh_database


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


async def test_answers_carry_no_storage_internals(
    database: str, platform: RunningFake, tmp_path: Path
) -> None:
    """A database that breaks under a running sidecar (a column gone) answers ingest and
    journeys with 503 `storage_error` and a request id; the column's name, and the database's
    address, appear only in the log line with that id."""
    await empty(database)
    base = settings_for(platform, tmp_path)
    settings = msgspec.structs.replace(
        base, outbox=msgspec.structs.replace(base.outbox, url=database)
    )
    sidecar = await start(settings)
    conn = await asyncpg.connect(database)
    try:
        async with aiohttp.ClientSession(base_url=sidecar.url) as client:
            event = make_event()
            async with client.post("/v1/events", json=event) as resp:
                assert resp.status == 202
            await conn.execute(f"ALTER TABLE {SCHEMA}.events RENAME COLUMN sensor TO broken")
            with capture_logs() as logs:
                answers = []
                for method, path, body in (
                    ("POST", "/v1/events", make_event()),
                    ("GET", f"/v1/events/{event['id']}", None),
                ):
                    async with client.request(method, path, json=body) as resp:
                        assert resp.status == 503, await resp.text()
                        assert resp.headers["Retry-After"]
                        answers.append(await resp.json())
        for answer in answers:
            assert answer["error"] == "storage_error"
            text = str(answer)
            assert "sensor" not in text
            assert "column" not in text
            assert "127.0.0.1" not in text
            (line,) = [e for e in logs if e.get("request_id") == answer["request_id"]]
            assert "sensor" in line["detail"]
    finally:
        await conn.execute(f"ALTER TABLE {SCHEMA}.events RENAME COLUMN broken TO sensor")
        await conn.close()
        await sidecar.stop()
