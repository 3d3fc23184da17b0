"""The ops listener (`ops.port`) from another host (docs/app-developers.md): `/metrics` answers
without a token, as Prometheus scrapes it in a pod; every other operators' route keeps its
protection. The other host is a network namespace this test makes (root and iproute2 needed;
skipped, saying why, where it cannot be made)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from .conftest import StartSidecar, free_port


@pytest.fixture
def other_host() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this host by a veth pair: (its name, this host's address
    on the pair)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a network namespace needs root and iproute2's `ip`")
    tag = f"{random.randrange(16**6):06x}"
    name, subnet = f"cs{tag}", f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    host_if, ns_if = f"ch{tag}", f"cn{tag}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", name)
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", f"{subnet}.1/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{subnet}.2/24", "dev", ns_if)
        ip("netns", "exec", name, "ip", "link", "set", ns_if, "up")
    except subprocess.CalledProcessError as e:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        pytest.skip(f"no network namespace could be made here: {e.stderr.decode().strip()}")
    try:
        yield name, f"{subnet}.1"
    finally:
        subprocess.run(["ip", "link", "delete", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


async def fetch_from(namespace: str, url: str) -> tuple[int, str]:
    """GET a URL from inside the namespace: its status and body."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen({url!r}, timeout=10); print(r.status); "
        "print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        namespace,
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    status, _, body = out.decode().partition("\n")
    return int(status), body


async def test_metrics_answer_another_host_without_a_token(
    custom: StartSidecar, other_host: tuple[str, str]
) -> None:
    """From another host, the ops listener's `/metrics` answers 200 with the metrics, no token
    asked; `/v1/status` and the dead letters still need the admin token."""
    namespace, address = other_host
    sidecar, _ = await custom(
        ops={"port": free_port(), "host": address}, admin={"token": "admin-token-0123456789"}
    )
    status, body = await fetch_from(namespace, f"{sidecar.ops_url}/metrics")
    assert status == 200
    assert "caliper_sidecar_events_received_total" in body
    for path in ("/v1/status", "/v1/dead-letters"):
        status, _ = await fetch_from(namespace, f"{sidecar.ops_url}{path}")
        assert status == 401, path


async def test_admin_routes_answer_only_this_machine_without_an_admin_token(
    custom: StartSidecar, other_host: tuple[str, str]
) -> None:
    """Without `admin.token`, the dead letters answer on loopback only (as every admin test
    on loopback uses them): from another host, 403 and why."""
    namespace, address = other_host
    sidecar, _ = await custom(ops={"port": free_port(), "host": address})
    status, body = await fetch_from(namespace, f"{sidecar.ops_url}/v1/dead-letters")
    assert status == 403, body
    assert "only on loopback unless admin.token is set" in body
