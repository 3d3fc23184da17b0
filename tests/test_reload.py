"""SIGHUP reloads without a restart and without refusing a request (SPEC §3): sender tokens,
the TLS certificate (a real TLS client sees the switch), `admin.token`, `log.level`; a failed
reload keeps everything; other keys changed are named as needing a restart. The real process."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SidecarProcess, eventually, free_port, make_events, write_config
from .test_security import self_signed

OLD, NEW = "old-sender-token-0123456789", "new-sender-token-0123456789"


async def post(url: str, token: str, ssl_context: ssl.SSLContext | bool = True) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/v1/events",
            json=make_events(1),
            headers={"Authorization": f"Bearer {token}"},
            ssl=ssl_context,
        ) as resp,
    ):
        return resp.status


def start(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess], **extra: Any
) -> tuple[SidecarProcess, Path]:
    port = free_port()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"room-1 {OLD}\n")
    config = write_config(
        tmp_path / "c.toml",
        platform,
        tmp_path / "outbox.db",
        port,
        receiver__tokens_file=str(tokens),
        **extra,
    )
    process = SidecarProcess(config, port, tmp_path / "run.log")
    processes.append(process)
    return process, tokens


async def hangup(process: SidecarProcess, count: int = 1) -> None:
    process.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: len([e for e in process.events() if e.startswith("reload")]) >= count)


async def test_tokens_change_without_refusing_a_request(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    """A token added to the tokens file works after SIGHUP and one removed stops working;
    requests sent all through the reload are all answered 202."""
    process, tokens = start(tmp_path, platform, processes)
    await process.wait_ready()
    tokens.write_text(f"room-1 {OLD}\nroom-2 {NEW}\n")

    answered: list[int] = []

    async def keep_sending() -> None:
        for _ in range(40):
            answered.append(await post(process.url, OLD))

    sending = asyncio.ensure_future(keep_sending())
    await eventually(lambda: len(answered) >= 3)  # requests are under way
    await hangup(process)
    await sending
    assert set(answered) == {202}
    assert await post(process.url, NEW) == 202
    tokens.write_text(f"room-2 {NEW}\n")
    await hangup(process, 2)
    assert await post(process.url, OLD) == 401
    assert await post(process.url, NEW) == 202
    assert await process.terminate() == 0
    assert '"applied":["receiver.tokens"]' in process.logs()


async def test_a_failed_reload_keeps_everything(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    """A tokens file that cannot be read at SIGHUP: nothing changes, the log says why."""
    process, tokens = start(tmp_path, platform, processes)
    await process.wait_ready()
    tokens.unlink()
    await hangup(process)
    assert "reload_failed" in process.events()
    assert await post(process.url, OLD) == 202


async def test_keys_that_need_a_restart_are_named(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    """Another key changed in the file is logged as needing a restart, and not applied."""
    process, _ = start(tmp_path, platform, processes)
    await process.wait_ready()
    config = tmp_path / "c.toml"
    config.write_text(config.read_text().replace("linger_ms = 20", "linger_ms = 50"))
    await hangup(process)
    assert '"needs_restart":["upstream.linger_ms"]' in process.logs()


async def test_a_new_certificate_for_new_connections(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    """The TLS certificate and key replaced on disk and SIGHUP: a new TLS connection is
    served the new certificate (a client trusting only the new one connects; one trusting
    only the old one no longer does)."""
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    old_cert, old_key = self_signed(old_dir)
    new_cert, new_key = self_signed(new_dir)
    live_cert, live_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    live_cert.write_bytes(old_cert.read_bytes())
    live_key.write_bytes(old_key.read_bytes())
    process, _ = start(
        tmp_path,
        platform,
        processes,
        receiver__tls_cert=str(live_cert),
        receiver__tls_key=str(live_key),
    )
    trusts_old = ssl.create_default_context(cafile=str(old_cert))
    trusts_new = ssl.create_default_context(cafile=str(new_cert))
    url = process.url.replace("http://", "https://")
    await eventually(lambda: _answers(url, trusts_old), timeout=20)
    live_cert.write_bytes(new_cert.read_bytes())
    live_key.write_bytes(new_key.read_bytes())
    await hangup(process)
    assert await post(url, OLD, trusts_new) == 202
    try:
        await post(url, OLD, trusts_old)
    except aiohttp.ClientConnectorCertificateError:
        pass
    else:
        raise AssertionError("the old certificate is still served")


async def _answers(url: str, context: ssl.SSLContext) -> bool:
    try:
        return await post(url, OLD, context) == 202
    except aiohttp.ClientError:
        return False


async def test_the_sender_is_named_in_logs_metrics_and_journeys(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    """A token labelled `room-1` in the tokens file: its events' ingest lines, the received
    metric and their journeys say `room-1`; a token issued for it does too."""
    process, _ = start(tmp_path, platform, processes)
    await process.wait_ready()
    events = make_events(3)
    headers = {"Authorization": f"Bearer {OLD}"}
    async with aiohttp.ClientSession(base_url=process.url) as http:
        async with http.post("/v1/events", json=events, headers=headers) as resp:
            assert resp.status == 202
        async with http.get(f"/v1/events/{events[0]['id']}", headers=headers) as resp:
            assert (await resp.json())["sender"] == "room-1"
        async with http.get("/metrics") as resp:
            assert 'caliper_sidecar_events_received_total{sender="room-1"} 3.0' in await resp.text()
        form = {"grant_type": "client_credentials", "client_secret": OLD}
        async with http.post("/oauth2/token", data=form) as resp:
            issued = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}
        later = make_events(1)
        async with http.post("/v1/events", json=later, headers=issued) as resp:
            assert resp.status == 202
        async with http.get(f"/v1/events/{later[0]['id']}", headers=issued) as resp:
            assert (await resp.json())["sender"] == "room-1"
    assert await process.terminate() == 0
    assert '"sender":"room-1"' in process.logs()
