"""Hostile networks, clocks, disks and peers (SPEC §6): each test is one way the sidecar was
broken on purpose, named after the promise it keeps."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.codec import utc_from_timestamp
from caliper_sidecar.config import load_settings
from caliper_sidecar.exceptions import ConfigError, OutboxLocked
from caliper_sidecar.http import connections
from caliper_sidecar.outbox import NewEvent, SqliteOutbox
from caliper_sidecar.tools.fake_timeback import RunningFake
from caliper_sidecar.validation import MAX_FINDINGS

from .conftest import (
    SidecarProcess,
    StartSidecar,
    cli,
    eventually,
    free_port,
    make_event,
    new_id,
    settings_for,
    write_config,
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


class TestBlankTokensDoNotCount:
    """#7: `tokens = [""]` is no protection, and `Bearer ` (empty) is never accepted."""

    def test_blank_tokens_on_a_network_address_refuse_to_start(self) -> None:
        with pytest.raises(ConfigError, match=r"receiver.tokens"):
            load_settings(
                None,
                environ={"SIDECAR_RECEIVER_HOST": "0.0.0.0", "SIDECAR_RECEIVER_TOKENS": " , "},
            )

    def test_blank_tokens_in_a_file_refuse_to_start(self, tmp_path: Path) -> None:
        config = tmp_path / "c.toml"
        config.write_text('[receiver]\nhost = "0.0.0.0"\ntokens = ["", "  "]\n')
        with pytest.raises(ConfigError, match=r"receiver.tokens"):
            load_settings(config, environ={})

    async def test_empty_bearer_is_refused(self, custom: StartSidecar) -> None:
        _, client = await custom(receiver={"tokens": ("", "real")})
        for header in ("Bearer ", "Bearer", "Bearer    "):
            async with client.post(
                "/v1/events", json=make_event(), headers={"Authorization": header}
            ) as resp:
                assert resp.status == 401, header


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
        await fake.wait_for(1)
        await asyncio.sleep(0.2)
        assert list(fake.received) == [upper["id"]]  # forwarded as received
        assert fake.duplicates == 0


class TestSecretsNeverShow:
    """#20 and #17: no repr of any settings section, and no stored answer, shows a secret."""

    def test_section_reprs_mask_secrets(self, tmp_path: Path) -> None:
        settings = load_settings(
            None,
            environ={
                "SIDECAR_OAUTH_CLIENT_SECRET": "s3cret-oauth",
                "SIDECAR_OAUTH_TOKEN_URL": "https://t.test/token",
                "SIDECAR_OAUTH_CLIENT_ID": "c",
                "SIDECAR_RECEIVER_TOKENS": "s3cret-sender-0123",
                "SIDECAR_ADMIN_TOKEN": "s3cret-admin",
                "SIDECAR_UPSTREAM_BEARER_TOKEN": "s3cret-bearer",
            },
        )
        shown = " ".join(
            repr(x)
            for x in (
                settings,
                settings.oauth,
                settings.receiver,
                settings.admin,
                settings.upstream,
                settings.receiver.tokens,
            )
        )
        assert "s3cret" not in shown
        assert settings.oauth.client_secret == "s3cret-oauth"  # still the value

    async def test_token_echoed_by_the_platform_is_redacted(
        self, custom: StartSidecar, fake: Any
    ) -> None:
        """A platform that echoes the request's bearer token in its refusal: the token is in
        neither the dead letter nor the log."""
        sidecar, client = await custom()
        event = make_event()
        fake.faults.refuse_ids.add(event["id"])
        original = fake._check

        async def echoing(request: Any) -> Any:
            status, body, headers = await original(request)
            if status == 422:
                body = {"error": "refused", "got": request.headers.get("Authorization")}
            return status, body, headers

        fake._check = echoing
        with capture_logs() as logs:
            async with client.post("/v1/events", json=event) as resp:
                assert resp.status == 202
            await eventually(lambda: _dead(sidecar))
        (dead,) = await sidecar.outbox.dead_letters(10)
        tokens = list(fake.tokens)
        assert tokens
        for token in tokens:
            assert token not in dead.response
            assert token not in repr(logs)
        assert "<redacted>" in dead.response


async def _dead(sidecar: Sidecar) -> bool:
    return bool(await sidecar.outbox.dead_letters(1))


class TestTokenEndpointOddities:
    """#16: a token endpoint's odd answers never break status or delivery."""

    @pytest.mark.parametrize("moment", [1e12 * 3600, 1e20, float("inf"), -1e20])
    def test_far_times_are_shown_not_crashed(self, moment: float) -> None:
        assert utc_from_timestamp(moment) is None or isinstance(utc_from_timestamp(moment), str)

    async def test_huge_expires_in(self, custom: StartSidecar, fake: Any) -> None:
        fake.token_ttl_s = 1e12
        _, client = await custom()
        async with client.post("/v1/events", json=make_event()) as resp:
            assert resp.status == 202
        await fake.wait_for(1)
        async with client.get("/v1/status") as resp:
            assert resp.status == 200

    async def test_token_with_a_line_break_is_not_kept(
        self, custom: StartSidecar, fake: Any
    ) -> None:
        """A token that cannot be sent in a header is refused; the next one is fetched, and
        delivery goes on."""
        fake.faults.token_answers.append(
            {"access_token": "abc\r\nX-Evil: 1", "token_type": "Bearer", "expires_in": 3600}
        )
        _, client = await custom()
        event = make_event()
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202
        await fake.wait_for({event["id"]}, timeout=10)


class TestCheckConfig:
    def test_exits_non_zero_on_what_run_refuses(self, tmp_path: Path) -> None:
        """`check-config` fails (exit 2) on a configuration `run` would refuse."""
        config = tmp_path / "c.toml"
        config.write_text('[upstream]\nendpoint = ""\n')
        out = subprocess.run(
            [sys.executable, "-m", "caliper_sidecar", "check-config", "-c", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 2
        assert "upstream.endpoint" in out.stderr


class TestClockSteps:
    """#3: a wall-clock step (NTP, a laptop waking up) never stops delivery."""

    async def test_backward_step_does_not_stop_delivery(
        self, custom: StartSidecar, fake: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Events stored, then the clock steps back an hour: they are still delivered (the
        linger wait used to compare the stepped clock with the stored receive time)."""
        _, client = await custom(upstream={"linger_ms": 200})
        fake.outage(0.5)
        events = [make_event() for _ in range(5)]
        async with client.post("/v1/events", json=events) as resp:
            assert resp.status == 202
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 3600)
        await fake.wait_for({e["id"] for e in events}, timeout=10)

    async def test_forward_step_does_not_resend_or_drop(
        self, custom: StartSidecar, fake: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, client = await custom()
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 86_400 * 3)
        events = [make_event() for _ in range(5)]
        async with client.post("/v1/events", json=events) as resp:
            assert resp.status == 202
        await fake.wait_for({e["id"] for e in events}, timeout=10)
        assert fake.duplicates == 0


class TestOneRunPerOutboxThroughLinks:
    """#4: one `run` per outbox holds through symlinks and hard links."""

    @pytest.mark.parametrize("link", ["symlink", "hardlink"])
    async def test_second_run_through_a_link_is_refused(
        self, platform: RunningFake, tmp_path: Path, link: str
    ) -> None:
        first = settings_for(platform, tmp_path)
        running = await start(first)
        try:
            other = tmp_path / "elsewhere"
            other.mkdir()
            alias = other / "alias.db"
            if link == "symlink":
                alias.symlink_to(first.outbox.path)
            else:
                os.link(first.outbox.path, alias)
            second = dataclasses.replace(
                first, outbox=dataclasses.replace(first.outbox, path=str(alias))
            )
            with pytest.raises(OutboxLocked, match="in use"):
                await start(second)
        finally:
            await running.stop()


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


class TestUnusableOutboxAtStart:
    """#14: an outbox that cannot be used is one line naming outbox.path, and exit 1 (exit 2
    where `run`'s checks before it starts can tell, as `check-config` does: a directory)."""

    @pytest.mark.parametrize("kind", ["garbage", "directory", "unwritable"])
    @pytest.mark.parametrize("command", [["run"], ["outbox", "stats"], ["dead-letters", "list"]])
    async def test_one_line_and_exit_1(
        self, platform: RunningFake, tmp_path: Path, kind: str, command: list[str]
    ) -> None:
        outbox = tmp_path / "outbox.db"
        if kind == "garbage":
            outbox.write_bytes(b"this is not a database, just bytes\n" * 200)
        elif kind == "directory":
            outbox.mkdir()
        else:
            outbox = Path("/proc/caliper-sidecar-test/outbox.db")
        config = write_config(tmp_path / "c.toml", platform, outbox, free_port())
        code, _, err = await cli(*command, "-c", str(config))
        assert code == (2 if kind == "directory" and command == ["run"] else 1), err
        lines = [
            line for line in err.splitlines() if line.strip() and "preflight_warning" not in line
        ]
        assert len(lines) == 1, err
        assert "outbox.path" in lines[0]
        assert str(outbox) in lines[0]


def break_outbox(path: Path, how: str) -> None:
    """Delete the outbox with its WAL, or truncate it, as a careless operator (or a cleanup
    job) would. (Truncating the `-shm` index under a running SQLite is a SIGBUS for any
    process that maps it: nothing a program can survive, so not tried.)"""
    if how == "truncated":
        os.truncate(path, 0)
        return
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class TestOutboxReplacedWhileRunning:
    """#13: an outbox deleted or truncated under a running sidecar: 503 and not ready, never
    a 500, never a 202 for an event stored nowhere."""

    @pytest.mark.parametrize("how", ["deleted", "truncated"])
    async def test_routes_answer_503_not_500(
        self, custom: StartSidecar, tmp_path: Path, how: str
    ) -> None:
        sidecar, client = await custom()
        async with client.post("/v1/events", json=make_event()) as resp:
            assert resp.status == 202
        break_outbox(Path(sidecar.runtime.settings.outbox.path), how)
        async with client.post("/v1/events", json=make_event()) as resp:
            assert resp.status == 503, await resp.text()
        async with client.get("/readyz") as resp:
            assert resp.status == 503
        for route in ("/v1/status", "/metrics", "/v1/dead-letters", "/healthz"):
            async with client.get(route) as resp:
                assert resp.status in (200, 503), (route, resp.status)


def many_dead_letters(path: Path, n: int) -> None:
    """Put n dead letters straight into an outbox file (as a long outage with a bad app
    would, only faster)."""
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO dead_letters (id, body, received_at, reason, status, response, "
            "attempts, dead_lettered_at) VALUES (?, ?, 0, 'refused', 422, '', 1, 0)",
            [(new_id(), json.dumps(make_event()).encode()) for _ in range(n)],
        )
    conn.close()


class TestLargeDeadLetterOperations:
    """#10: replay and purge of many dead letters go in chunks: a running sidecar's ingest
    never waits behind one huge transaction, and the operator sees a running count."""

    async def test_replay_all_is_chunked_and_counted(self, tmp_path: Path) -> None:
        path = tmp_path / "outbox.db"
        async with SqliteOutbox(path) as outbox:
            pass
        many_dead_letters(path, 4500)
        seen: list[int] = []
        async with SqliteOutbox(path) as outbox:
            appended = asyncio.ensure_future(outbox.append([NewEvent(new_id(), b"{}")]))
            assert await outbox.replay_dead_letters(None, progress=seen.append) == 4500
            await appended
            assert (await outbox.stats()).events == 4501
        assert seen == [1000, 2000, 3000, 4000, 4500]

    async def test_cli_shows_a_running_count(self, platform: RunningFake, tmp_path: Path) -> None:
        path = tmp_path / "outbox.db"
        async with SqliteOutbox(path):
            pass
        many_dead_letters(path, 2500)
        config = write_config(tmp_path / "c.toml", platform, path, free_port())
        code, _, err = await cli("dead-letters", "purge", "--all", "-c", str(config))
        assert code == 0, err
        assert "1000" in err
        assert "2000" in err
        async with SqliteOutbox(path) as outbox:
            assert (await outbox.stats()).dead_letters == 0


class TestShutdownIsBounded:
    """#15: SIGTERM with a client trickling its body still exits 0, well within the shipped
    stop timeouts (systemd's TimeoutStopSec and Kubernetes' grace period, 60 s)."""

    async def test_sigterm_with_a_trickling_client(
        self, platform: RunningFake, tmp_path: Path, processes: list[SidecarProcess]
    ) -> None:
        port = free_port()
        config = write_config(tmp_path / "c.toml", platform, tmp_path / "outbox.db", port)
        process = SidecarProcess(config, port, tmp_path / "run.log")
        processes.append(process)
        await process.wait_ready()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n["
        )
        await writer.drain()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    await asyncio.sleep(0.5)
                    writer.write(b" ")
                    await writer.drain()

        trickling = asyncio.ensure_future(trickle())
        await asyncio.sleep(1)
        try:
            assert await process.terminate(timeout=25) == 0
        finally:
            trickling.cancel()
            writer.close()
        assert "stopped" in process.events()


class TestConnectionDeadlinesAndBound:
    """#2: connections that never complete a request are closed; open connections are bounded;
    the condition is logged once."""

    @pytest.fixture(autouse=True)
    def short_deadlines(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(connections, "HEADERS_DEADLINE_S", 1.0)
        monkeypatch.setattr(connections, "BODY_DEADLINE_S", 1.0)
        monkeypatch.setattr(connections, "MAX_CONNECTIONS", 30)

    async def closed_by_server(self, url: str, send: bytes) -> bytes:
        """Send these bytes and keep the connection open; what the server answered before it
        closed (within 10 s, else the test fails)."""
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(send)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    @pytest.mark.parametrize(
        "send",
        [
            pytest.param(b"", id="idle"),
            pytest.param(
                b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty", id="headers"
            ),
        ],
    )
    async def test_incomplete_headers_are_closed(self, custom: StartSidecar, send: bytes) -> None:
        sidecar, _ = await custom()
        assert await self.closed_by_server(sidecar.url, send) == b""

    @pytest.mark.parametrize(
        "send",
        [
            pytest.param(b"Content-Length: 5000\r\n\r\n[{", id="short-body"),
            pytest.param(b'Transfer-Encoding: chunked\r\n\r\n5\r\n[{"a"\r\n', id="endless-chunks"),
        ],
    )
    async def test_bodies_that_never_end_get_408(self, custom: StartSidecar, send: bytes) -> None:
        sidecar, _ = await custom()
        head = b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        answer = await self.closed_by_server(sidecar.url, head + send)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]

    async def test_a_flood_of_idle_connections_does_not_starve_real_requests(
        self, custom: StartSidecar
    ) -> None:
        sidecar, client = await custom()
        host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
        with capture_logs() as logs:
            idle = [await asyncio.open_connection(host, int(port)) for _ in range(60)]
        try:
            with capture_logs() as more:
                for _ in range(5):
                    async with client.get("/healthz") as resp:
                        assert resp.status == 200
                    async with client.post("/v1/events", json=make_event()) as resp:
                        assert resp.status == 202
            limited = [e for e in logs + more if e["event"] == "connections_limited"]
            assert len(limited) == 1
            assert len(sidecar.runner.server.connections) <= 30  # type: ignore[union-attr]
        finally:
            for _, writer in idle:
                writer.close()

    async def test_more_idle_connections_than_descriptors(
        self, platform: RunningFake, tmp_path: Path, processes: list[SidecarProcess]
    ) -> None:
        """The defect as found: 1,100 idle connections to a process limited to 1,024 open
        files. /healthz and ingest still answer, the log has one line about it and no
        'accept() out of system resource' traceback."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1400:
            pytest.skip(f"this test process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
        port = free_port()
        config = write_config(tmp_path / "c.toml", platform, tmp_path / "outbox.db", port)
        process = SidecarProcess(config, port, tmp_path / "run.log", max_files=1024)
        processes.append(process)
        await process.wait_ready()
        idle = []
        try:
            for _ in range(1100):
                idle.append(await asyncio.open_connection("127.0.0.1", port))
            async with aiohttp.ClientSession(base_url=process.url) as client:
                for _ in range(3):
                    async with client.get("/healthz") as resp:
                        assert resp.status == 200
                    async with client.post("/v1/events", json=make_event()) as resp:
                        assert resp.status == 202
        finally:
            for _, writer in idle:
                writer.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert await process.terminate() == 0
        logs = process.logs()
        assert "out of system resource" not in logs
        assert process.events().count("connections_limited") == 1


def noisy_event(size: int) -> dict[str, Any]:
    """An event whose object has as many unknown properties as fit in `size` bytes: each one is
    a warning."""
    event = make_event()
    count = size // 22
    event["object"].update({f"k{i:07d}": 1 for i in range(count)})
    return event


class TestBoundedMemory:
    """#6: memory stays bounded whatever many clients send at once."""

    async def test_findings_per_answer_are_bounded_and_counted(
        self, client: aiohttp.ClientSession
    ) -> None:
        event = noisy_event(200_000)
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202
            body = await resp.json()
        assert len(body["warnings"]) == MAX_FINDINGS
        assert body["warnings_total"] > 9000
        broken = [make_event(action="Glanced") for _ in range(300)]
        async with client.post("/v1/events", json=broken) as resp:
            assert resp.status == 422
            body = await resp.json()
        assert len(body["errors"]) == MAX_FINDINGS
        assert body["errors_total"] == 300

    async def test_many_heavy_requests_at_once(
        self, platform: RunningFake, tmp_path: Path, processes: list[SidecarProcess]
    ) -> None:
        """24 concurrent requests of 1 MiB, each full of warnings: the process's peak memory
        stays bounded (it reached 447 MB, with a 14 s stall of the event loop)."""
        port = free_port()
        config = write_config(
            tmp_path / "c.toml",
            platform,
            tmp_path / "outbox.db",
            port,
            upstream__batch_max_bytes=2_000_000,
        )
        process = SidecarProcess(config, port, tmp_path / "run.log")
        processes.append(process)
        await process.wait_ready()
        body = json.dumps(noisy_event(1_000_000)).encode()
        assert len(body) < 1_048_576

        async def one(client: aiohttp.ClientSession) -> int:
            async with client.post(
                "/v1/events", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                return resp.status

        async with aiohttp.ClientSession(base_url=process.url) as client:
            statuses = await asyncio.gather(*(one(client) for _ in range(24)))
        assert set(statuses) <= {202, 503}
        assert 202 in statuses
        peak_mb = peak_rss_kib(process.proc.pid) / 1024
        assert peak_mb < 250, f"peak RSS {peak_mb:.0f} MB"


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")
