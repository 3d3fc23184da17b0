"""Shared fixtures: a real fake TimeBack on a free port, sidecars in-process or as the real
CLI in a subprocess, and valid events."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.app import Sidecar, start
from sidecar.config import (
    LogSettings,
    OAuthSettings,
    OutboxSettings,
    ReceiverSettings,
    RetrySettings,
    Settings,
    UpstreamSettings,
)
from sidecar.mock_upstream import FakeTimeBack, RunningFake, start_fake
from sidecar.samples import sample_events

SHARED = Path(__file__).resolve().parents[2] / "shared"


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait until predicate() (sync or async) is true; fail after the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def new_id() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def make_event(**fields: Any) -> dict[str, Any]:
    """A valid TimeBack event (a ViewEvent) with a fresh id; fields override."""
    event = sample_events()[6]
    event["id"] = new_id()
    event.update(fields)
    return event


def make_events(n: int) -> list[dict[str, Any]]:
    return [make_event() for _ in range(n)]


@pytest.fixture
async def platform() -> AsyncIterator[RunningFake]:
    running = await start_fake(FakeTimeBack())
    yield running
    await running.close()


@pytest.fixture
def fake(platform: RunningFake) -> FakeTimeBack:
    return platform.fake


def settings_for(platform: RunningFake, tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for a sidecar forwarding to the fake, with fast retries; sections override."""
    base = Settings(
        receiver=ReceiverSettings(port=0),
        outbox=OutboxSettings(path=str(tmp_path / "outbox.db"), synchronous="normal"),
        upstream=UpstreamSettings(endpoint=platform.events_url, linger_ms=20),
        oauth=OAuthSettings(
            token_url=platform.token_url,
            client_id=platform.fake.client_id,
            client_secret=platform.fake.client_secret,
        ),
        retry=RetrySettings(initial_backoff_s=0.05, max_backoff_s=0.2),
        log=LogSettings(level="warning"),
    )
    changes = {
        name: dataclasses.replace(getattr(base, name), **values)
        for name, values in sections.items()
    }
    return dataclasses.replace(base, **changes)


@pytest.fixture
async def sidecar(platform: RunningFake, tmp_path: Path) -> AsyncIterator[Sidecar]:
    running = await start(settings_for(platform, tmp_path))
    yield running
    await running.stop()


@pytest.fixture
async def client(sidecar: Sidecar) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sidecar.url) as session:
        yield session


# -- the real CLI in a subprocess ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    path: Path,
    platform: RunningFake,
    outbox: Path,
    port: int,
    *,
    oauth: bool = True,
    **extra: object,
) -> Path:
    """A TOML config for a subprocess sidecar forwarding to the fake (with OAuth, unless
    `oauth` is False); `section__key=value` arguments add or change keys."""
    sections: dict[str, dict[str, Any]] = {
        "receiver": {"port": port},
        "outbox": {"path": str(outbox)},
        "upstream": {"endpoint": platform.events_url, "linger_ms": 20, "timeout_s": 5},
        "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
    }
    if oauth:
        sections["oauth"] = {
            "token_url": platform.token_url,
            "client_id": platform.fake.client_id,
            "client_secret": platform.fake.client_secret,
        }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        sections.setdefault(section, {})[key] = value
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    path.write_text("\n".join(lines) + "\n")
    return path


class SidecarProcess:
    """`python -m sidecar run` in a subprocess, its logs in a file."""

    def __init__(self, config: Path, port: int, log: Path, env: dict[str, str] | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until it listens (asynchronously: the fake platform shares this loop)."""
        port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited {self.proc.returncode}: {self.logs()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError(f"sidecar not ready: {self.logs()}")

    async def wait_exit(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"sidecar did not exit: {self.logs()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    def events(self) -> list[str]:
        """The `event` of every JSON log line so far, in order."""
        names = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                names.append(json.loads(line).get("event", ""))
        return names

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def processes() -> Iterator[list[SidecarProcess]]:
    """Processes started by a test; any still running at its end are killed."""
    started: list[SidecarProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.kill()
        p.proc.wait()
        p._log.close()
