"""The real `caliper-sidecar run` process: end to end, SIGKILL, SIGTERM, one run per outbox."""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import (
    SidecarProcess,
    eventually,
    free_port,
    make_events,
    sdk_envelopes,
    write_config,
)


def launch(
    tmp_path: Path,
    platform: RunningFake,
    processes: list[SidecarProcess],
    name: str = "a",
    outbox: Path | None = None,
    **extra: Any,
) -> SidecarProcess:
    port = free_port()
    config = write_config(
        tmp_path / f"{name}.toml", platform, outbox or tmp_path / "outbox.db", port, **extra
    )
    process = SidecarProcess(config, port, tmp_path / f"{name}.log")
    processes.append(process)
    return process


async def post(url: str, events: list[dict[str, object]]) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/events", json=events) as resp,
    ):
        await resp.read()
        return resp.status


class TestRun:
    async def test_end_to_end(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """Events posted to the real process reach the fake TimeBack through OAuth."""
        p = launch(tmp_path, platform, processes)
        await p.wait_ready()
        events = make_events(25)
        assert await post(p.url, events) == 202
        await platform.fake.wait_for({e["id"] for e in events}, timeout=20)
        assert platform.fake.token_requests == 1
        assert await p.terminate() == 0
        logs = p.logs()
        assert "batch_delivered" in p.events()
        assert platform.fake.client_secret not in logs

    @pytest.mark.parametrize("synchronous", ["full", "normal"])
    async def test_sigkill_after_202_loses_nothing(
        self,
        tmp_path: Path,
        platform: RunningFake,
        processes: list[SidecarProcess],
        synchronous: str,
    ) -> None:
        """An event acknowledged with 202 survives SIGKILL right after, and is delivered
        after the restart."""
        platform.fake.outage(3600)  # nothing leaves before the kill
        p = launch(tmp_path, platform, processes, outbox__synchronous=synchronous)
        await p.wait_ready()
        acknowledged: set[str] = set()
        for _ in range(10):
            events = make_events(5)
            assert await post(p.url, events) == 202
            acknowledged |= {e["id"] for e in events}
        p.kill()
        platform.fake.faults.outage_until = 0
        again = launch(tmp_path, platform, processes, name="b")
        await again.wait_ready()
        await platform.fake.wait_for(acknowledged, timeout=20)
        assert await again.terminate() == 0

    async def test_second_run_on_the_same_outbox_refuses(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        first = launch(tmp_path, platform, processes)
        await first.wait_ready()
        second = launch(tmp_path, platform, processes, name="b")
        assert await second.wait_exit() == 1
        assert "in use by caliper-sidecar run" in second.logs()
        assert await first.terminate() == 0

    async def test_sigterm_exits_zero_and_keeps_the_rest(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
    ) -> None:
        """SIGTERM during an outage: exit 0 within the bound; the events wait on disk."""
        platform.fake.outage(3600)
        p = launch(tmp_path, platform, processes, upstream__timeout_s=1)
        await p.wait_ready()
        events = make_events(5)
        assert await post(p.url, events) == 202
        assert await p.terminate(timeout=15) == 0
        assert "stopped" in p.events()
        platform.fake.faults.outage_until = 0
        again = launch(tmp_path, platform, processes, name="b")
        await again.wait_ready()
        await platform.fake.wait_for({e["id"] for e in events}, timeout=20)
        assert await again.terminate() == 0


class TestStartupErrors:
    """Mistakes an operator makes at start-up: a clear message, a non-zero exit, and no
    process left hanging (an opened outbox would keep it alive)."""

    async def run_with(self, tmp_path: Path, **env: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "caliper_sidecar",
            "run",
            env={
                "PATH": "/usr/bin:/bin",
                "SIDECAR_UPSTREAM_ENDPOINT": "http://127.0.0.1:9/events/1.0/",
                "SIDECAR_OUTBOX_PATH": str(tmp_path / "outbox.db"),
                **env,
            },
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode is not None
        return proc.returncode, err.decode()

    async def test_port_in_use(self, tmp_path: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            code, err = await self.run_with(tmp_path, SIDECAR_RECEIVER_PORT=str(port))
        assert code == 1
        assert f"cannot listen on 127.0.0.1:{port}" in err
        assert "Traceback" not in err

    async def test_unreadable_tls_files(self, tmp_path: Path) -> None:
        code, err = await self.run_with(
            tmp_path,
            SIDECAR_RECEIVER_TLS_CERT=str(tmp_path / "missing.pem"),
            SIDECAR_RECEIVER_TLS_KEY=str(tmp_path / "missing.key"),
        )
        assert code == 2
        assert "receiver.tls_cert / receiver.tls_key cannot be loaded" in err
        assert "Traceback" not in err

    async def test_missing_private_key(self, tmp_path: Path) -> None:
        code, err = await self.run_with(
            tmp_path,
            SIDECAR_OAUTH_TOKEN_URL="http://127.0.0.1:9/token",
            SIDECAR_OAUTH_CLIENT_ID="c",
            SIDECAR_OAUTH_AUTH_METHOD="private_key_jwt",
            SIDECAR_OAUTH_PRIVATE_KEY_FILE=str(tmp_path / "missing.pem"),
        )
        assert code == 2
        assert "oauth.private_key_file cannot be read" in err
        assert "Traceback" not in err

    async def test_non_loopback_without_tokens(self, tmp_path: Path) -> None:
        """Listening beyond this machine without app tokens is refused, saying which key."""
        code, err = await self.run_with(tmp_path, SIDECAR_RECEIVER_HOST="0.0.0.0")
        assert code == 2
        assert "receiver.tokens" in err


class TestTimebackSdkApp:
    """An app using TimeBack's SDK, pointed at the real process instead of the platform."""

    @pytest.mark.parametrize("upstream", ["beyond-ai", "learnwith-ai"])
    async def test_sdk_app_through_the_sidecar(
        self,
        tmp_path: Path,
        platform: RunningFake,
        processes: list[SidecarProcess],
        upstream: str,
    ) -> None:
        """The SDK's calls (token with Basic auth, its envelopes on its send path, job status)
        work against `caliper-sidecar run`, and the events come out as the platform behind it
        expects: Beyond AI confirms them through its jobs; LearnWith.AI gets its own form."""
        beyond = upstream == "beyond-ai"
        endpoint = platform.beyond_url if beyond else platform.learnwith_url
        extra: dict[str, Any] = {
            "upstream__endpoint": endpoint,
            "upstream__platform": upstream,
            "receiver__tokens": ["t-1-sender-token-01"],
        }
        if beyond:
            extra["upstream__jobs_url"] = platform.jobs_url
        p = launch(tmp_path, platform, processes, **extra)
        await p.wait_ready()
        send_path = "/caliper/event" if beyond else "/caliper/v1p2"
        ids: list[str] = []
        async with aiohttp.ClientSession(base_url=p.url) as app:
            async with app.post(
                "/auth/1.0/token",
                data={"grant_type": "client_credentials"},
                headers={
                    "Authorization": "Basic "
                    + base64.b64encode(b"my-app:t-1-sender-token-01").decode()
                },
            ) as resp:
                token = (await resp.json())["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            jobs = []
            for envelope in sdk_envelopes("beyond-ai"):
                async with app.post(send_path, json=envelope, headers=headers) as resp:
                    assert resp.status == 200
                    jobs.append((await resp.json())["jobId"])
                ids += [e["id"] for e in envelope["data"]]
            await platform.fake.wait_for(set(ids), timeout=20)

            async def all_completed() -> bool:
                for job in jobs:
                    async with app.get(f"/jobs/{job}/status", headers=headers) as resp:
                        if (await resp.json())["job"]["state"] != "completed":
                            return False
                return True

            await eventually(all_completed, timeout=20)
            async with app.get(f"/v1/events/{ids[0]}", headers=headers) as resp:
                journey = await resp.json()
        assert journey["state"] == ("confirmed" if beyond else "delivered")
        arrived = platform.fake.received[ids[0]]
        assert arrived["profile"] == ("TimebackProfile" if beyond else "AggregationProfile")
        assert await p.terminate() == 0


async def test_sighup_reloads_the_admin_token_and_the_log_level(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    """SIGHUP (which would kill it by default) reloads: a new `admin.token` opens the admin
    routes to it from the next request, and `log.level = "warning"` silences the ingest
    lines; the process keeps running and takes events."""
    p = launch(tmp_path, platform, processes, admin__token="admin-token-one-0123456")
    await p.wait_ready()
    config = tmp_path / "a.toml"
    text = config.read_text().replace("admin-token-one-0123456", "admin-token-two-0123456")
    config.write_text(text + '[log]\nlevel = "warning"\n')
    p.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "reloaded" in p.events())
    assert p.proc.poll() is None
    async with aiohttp.ClientSession() as http:
        for token, status in (("admin-token-one-0123456", 401), ("admin-token-two-0123456", 200)):
            async with http.get(
                f"{p.url}/v1/dead-letters", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == status
    ingest_lines = p.events().count("ingest")
    assert await post(p.url, make_events(1)) == 202
    assert await p.terminate() == 0
    assert p.events().count("ingest") == ingest_lines
    assert '"applied":["admin.token","log.level"]' in p.logs()
