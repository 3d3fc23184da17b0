"""deploy/Containerfile, built here as deploy/image/build.sh builds it (no registry: a Debian
base made by mmdebstrap, podman with runc, `podman build --network=none`), then run: the demo
inside it, `run` with a sender token taking an event posted from the host through a published
port, the non-root user and the HEALTHCHECK, and the saved archive loaded into another podman.

Podman's storage and the base root file system stay in .cache/image (ignored by git), so a
second run reuses the base and the unchanged layers. Skipped only where podman cannot be had:
not installed and not root (as root, build.sh installs it with apt-get)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .installs import one_at_a_time

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "deploy" / "image" / "build.sh"
EVENT = ROOT / "examples" / "event.json"

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Image:
    tag: str
    archive: Path
    env: dict[str, str]  # CONTAINERS_CONF and CONTAINERS_STORAGE_CONF of build.sh's podman

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )


def podman_environment(cache: Path) -> dict[str, str]:
    """The environment deploy/image/podman-env.sh sets, so that each podman call here talks
    to the storage and configuration build.sh used."""
    script = f'. "{ROOT}/deploy/image/podman-env.sh" && env -0'
    env = {**os.environ, "CALIPER_IMAGE_CACHE": str(cache)}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.decode().split("\0") if "=" in line)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    if shutil.which("podman") is None and os.geteuid() != 0:
        pytest.skip("podman is not installed, and only root can install it (apt-get)")
    cache = ROOT / ".cache" / "image"
    archive = tmp_path_factory.mktemp("image") / "caliper-sidecar.tar"
    env = {**os.environ, "CALIPER_IMAGE_CACHE": str(cache)}
    started = time.monotonic()
    # build.sh installs with apt what it lacks: then not beside another test's install.
    installing = not all(shutil.which(tool) for tool in ("podman", "runc", "mmdebstrap"))
    with one_at_a_time() if installing else contextlib.nullcontext():
        built = subprocess.run(
            ["bash", str(BUILD), str(archive)], env=env, capture_output=True, text=True, timeout=600
        )
    assert built.returncode == 0, built.stdout + built.stderr
    print(built.stdout, f"build.sh: {time.monotonic() - started:.0f} s", sep="")
    # build.sh's last line: "built TAG in N s; saved to ARCHIVE (SIZE)"
    tag = built.stdout.splitlines()[-1].split()[1]
    return Image(tag=tag, archive=archive, env=podman_environment(cache))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_demo_inside(image: Image) -> None:
    """The demo (fake TimeBack, sidecar, every event delivered) in the image, exit 0."""
    # --health-interval=disable: podman would schedule the healthcheck with systemd timers,
    # which these machines lack; the check itself is run by hand below.
    ran = image.podman(
        "run", "--rm", "--network=none", "--health-interval=disable", image.tag, "demo"
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "OK: every event reached TimeBack" in ran.stdout


@pytest.fixture
def running(image: Image, tmp_path: Path) -> Iterator[tuple[str, int, str]]:
    """`run` in the image, the receiver on 0.0.0.0 with a sender token, published on a host
    port of loopback. The upstream is an address inside the container where nothing listens:
    the test needs events taken, not sent, and no traffic may leave the machine."""
    token = "image-test-token-0123456789abcdef"
    tokens = tmp_path / "tokens"
    tokens.write_text(token + "\n")
    tokens.chmod(0o644)  # read by uid 10001 inside
    port = free_port()
    name = f"caliper-sidecar-test-{port}"
    started = image.podman(
        "run", "--detach", "--name", name, "--health-interval=disable",
        "--publish", f"127.0.0.1:{port}:8787",
        "--volume", f"{tokens}:/run/secrets/tokens:ro,Z",
        "--env", "SIDECAR_RECEIVER_HOST=0.0.0.0",
        "--env", "SIDECAR_RECEIVER_TOKENS_FILE=/run/secrets/tokens",
        "--env", "SIDECAR_UPSTREAM_ENDPOINT=http://127.0.0.1:9/caliper/event",
        "--env", "SIDECAR_OAUTH_TOKEN_URL=http://127.0.0.1:9/auth/1.0/token",
        "--env", "SIDECAR_OAUTH_CLIENT_ID=image-test",
        "--env", "SIDECAR_OAUTH_CLIENT_SECRET=image-test-secret-of-16+",
        image.tag,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        yield name, port, token
    finally:
        logs = image.podman("logs", name)
        print(logs.stdout[-3000:], logs.stderr[-3000:])
        image.podman("rm", "--force", "--time", "5", name)


def post(port: int, token: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/events", data=EVENT.read_bytes(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            status: int = answer.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


def test_run_takes_an_event_from_the_host(image: Image, running: tuple[str, int, str]) -> None:
    name, port, token = running
    deadline = time.monotonic() + 30
    while True:  # the receiver starts within a few seconds
        try:
            status = post(port, token)
            break
        except (OSError, urllib.error.URLError):
            assert time.monotonic() < deadline, "the receiver never answered"
            time.sleep(0.5)
    assert status == 202
    assert post(port, None) == 401  # on every interface, so a token is required
    # The event is in the outbox, on the volume, as the non-root user.
    stats = image.podman("exec", name, "caliper-sidecar", "outbox", "stats", "--json")
    assert stats.returncode == 0, stats.stdout + stats.stderr
    user = image.podman("exec", name, "id", "-u")
    assert user.stdout.strip() == "10001"
    owner = image.podman("exec", name, "stat", "-c", "%u %a", "/var/lib/caliper-sidecar/outbox.db")
    assert owner.stdout.split() == ["10001", "600"]
    health = image.podman("healthcheck", "run", name)
    assert health.returncode == 0, health.stdout + health.stderr


def test_image_properties(image: Image) -> None:
    inspected = image.podman("image", "inspect", image.tag)
    assert inspected.returncode == 0, inspected.stderr
    (config,) = json.loads(inspected.stdout)
    assert config["Config"]["User"] == "10001"
    assert "/var/lib/caliper-sidecar" in config["Config"]["Volumes"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    assert config["Config"]["Entrypoint"] == ["caliper-sidecar"]


def test_archive_loads_elsewhere_with_its_healthcheck(image: Image, tmp_path: Path) -> None:
    """The file build.sh saves, loaded into another podman's empty storage as a school's
    would: same tag, the healthcheck kept (an oci-archive loses it), and it runs."""
    other = Image(image.tag, image.archive, podman_environment(tmp_path / "school"))
    try:
        loaded = other.podman("load", "--input", str(image.archive))
        assert loaded.returncode == 0, loaded.stderr
        inspected = other.podman("image", "inspect", image.tag)
        (config,) = json.loads(inspected.stdout)
        assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
        version = other.podman(
            "run", "--rm", "--network=none", "--health-interval=disable", image.tag, "--version"
        )
        assert version.returncode == 0, version.stderr
    finally:
        # Unmounted and gone before pytest deletes tmp_path (not `system reset`: that also
        # removes networks, which every podman on the machine shares).
        other.podman("rmi", "--all", "--force")
        # Podman leaves its overlay directory mounted on itself: undone, so tmp_path can go.
        overlay = tmp_path / "school" / "storage" / "overlay"
        subprocess.run(["umount", str(overlay)], capture_output=True, check=False)
        shutil.rmtree(other.env["CALIPER_IMAGE_RUN"], ignore_errors=True)
