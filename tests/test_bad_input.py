"""Bytes that are not what they should be (docs/guarantees.md): a 4xx with a reason, never a 500 and
never a changed event, whichever door they come in by."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.app import Sidecar

from .conftest import (
    StartSidecar,
    make_event,
)


async def raw_request(url: str, request: bytes) -> bytes:
    """Send these exact bytes and read the whole answer (headers that are not UTF-8…)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return answer


class TestInvalidInputIsA4xxNeverA500:
    """#8, #9, #11, #18: bytes that are not what they should be get a 4xx with a reason."""

    @pytest.mark.parametrize(
        ("where", "value"),
        [
            ("status", {"x": 1}),
            ("status", ["Active"]),
            ("roles", [{"x": 1}]),
            ("roles", [["Learner"]]),
        ],
    )
    async def test_object_where_a_term_belongs(
        self, client: aiohttp.ClientSession, where: str, value: Any
    ) -> None:
        """An object or an array where a vocabulary term belongs: 422, not a 500."""
        event = make_event(
            membership={
                "id": "https://example.edu/terms/201601/courses/7/sections/1/rosters/1",
                "type": "Membership",
                "member": "https://example.edu/users/554433",
                "organization": "https://example.edu/terms/201601/courses/7/sections/1",
                "roles": ["Learner"],
                "status": "Active",
                where: value,
            }
        )
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 422, await resp.text()

    @pytest.mark.parametrize("path", ["/v1/events", "/v1/dead-letters", "/caliper/event"])
    async def test_authorization_header_that_is_not_utf8(
        self, custom: StartSidecar, path: str
    ) -> None:
        sidecar, _ = await custom(receiver={"tokens": ("t",)}, admin={"token": "a"})
        body = json.dumps(make_event()).encode()
        method = b"GET" if path == "/v1/dead-letters" else b"POST"
        answer = await raw_request(
            sidecar.url,
            method + b" " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer \xff\xfe\xc3\x28\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body,
        )
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]

    @pytest.mark.parametrize("number", ["1e999", "-1e999", "1E400"])
    async def test_numbers_beyond_a_float_are_refused(
        self, client: aiohttp.ClientSession, sidecar: Sidecar, number: str
    ) -> None:
        """A number no float can hold would be forwarded as `null`: refused at the door."""
        text = json.dumps(make_event(extensions={"n": 0})).replace('"n": 0', f'"n": {number}')
        async with client.post(
            "/v1/events", data=text, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400
            assert "not a finite number" in (await resp.json())["message"]
        assert (await sidecar.outbox.stats()).events == 0

    @pytest.mark.parametrize("encoding", ["bogus", "compress", "gzip, bogus"])
    async def test_unknown_content_encoding_is_415(
        self, client: aiohttp.ClientSession, encoding: str
    ) -> None:
        async with client.post(
            "/v1/events",
            data=json.dumps(make_event()),
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        ) as resp:
            assert resp.status == 415
            assert (await resp.json())["error"] == "unsupported_content_encoding"


async def validate_file(path: Path) -> tuple[int, str, str]:
    """`caliper-sidecar validate FILE` in a subprocess: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "caliper_sidecar",
        "validate",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


class TestOneParserForEveryDoor:
    """#12: `validate` and the receiver judge the same bytes the same way."""

    @pytest.mark.parametrize(
        "text",
        [
            b'{"a": NaN}',
            b'{"n": 1e999}',
            b"[" * 990 + b"]" * 990,
        ],
    )
    async def test_validate_agrees_with_the_receiver(
        self, client: aiohttp.ClientSession, tmp_path: Path, text: bytes
    ) -> None:
        path = tmp_path / "doc.json"
        path.write_bytes(text)
        code, out, err = await validate_file(path)
        assert code == 1, out + err
        assert "Traceback" not in err
        async with client.post(
            "/v1/events", data=text, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400

    async def test_byte_order_mark_is_the_same_everywhere(
        self, client: aiohttp.ClientSession, tmp_path: Path
    ) -> None:
        """A UTF-8 BOM before the JSON is ignored by both (RFC 8259 allows ignoring it)."""
        text = b"\xef\xbb\xbf" + json.dumps(make_event()).encode()
        path = tmp_path / "bom.json"
        path.write_bytes(text)
        code, out, _ = await validate_file(path)
        assert code == 0, out
        async with client.post(
            "/v1/events", data=text, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 202


class TestUuidCase:
    """#19: the same UUID in upper and lower case is one event."""

    async def test_case_variants_are_duplicates(
        self, client: aiohttp.ClientSession, sidecar: Sidecar, fake: Any
    ) -> None:
        event = make_event()
        upper = dict(event, id="URN:UUID:" + event["id"].removeprefix("urn:uuid:").upper())
        async with client.post("/v1/events", json=upper) as resp:
            answer = await resp.json()
        assert answer["accepted"] == 1
        assert answer["ids"] == [upper["id"]]  # the ids as the app sent them
        async with client.post("/v1/events", json=event) as resp:
            assert (await resp.json())["duplicates"] == 1
        await sidecar.dispatcher.drained(timeout=10)  # nothing more can be sent
        assert list(fake.received) == [upper["id"]]  # forwarded as received
        assert fake.duplicates == 0


class TestBoundedAnswers:
    """#5: what the platform or the token endpoint answers is read only as far as it is kept."""

    async def test_endless_error_body_from_the_platform(
        self, custom: StartSidecar, fake: Any
    ) -> None:
        fake.faults.huge_answers = 1
        _, client = await custom()
        event = make_event()
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202
        await fake.wait_for({event["id"]}, timeout=20)
        assert fake.huge_bytes_sent < 32 * 1_048_576

    async def test_endless_token_answer(self, custom: StartSidecar, fake: Any) -> None:
        fake.faults.huge_token_answers = 1
        _, client = await custom()
        event = make_event()
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202
        await fake.wait_for({event["id"]}, timeout=20)
        assert fake.huge_bytes_sent < 32 * 1_048_576
