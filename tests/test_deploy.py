"""deploy/: what can be checked without a container engine or a cluster. The manifests parse,
reference files and secrets that exist, configure the sidecar with keys it accepts, and the
systemd unit passes `systemd-analyze verify`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from caliper_sidecar.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def sidecar_environment(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The SIDECAR_* variables, with secret files replaced by readable temporary ones."""
    out = {}
    for key, value in env.items():
        if not key.startswith("SIDECAR_"):
            continue
        if key.endswith("_FILE"):
            path = tmp_path / key.lower()
            path.write_text("a-secret-of-at-least-16-characters\n")
            value = str(path)
        out[key] = value
    return out


class TestContainerfile:
    def test_slim_non_root_healthcheck_volume(self) -> None:
        """Statically; tests/test_image.py builds and runs it."""
        text = (DEPLOY / "Containerfile").read_text()
        # One file for a registry's Python base and the one deploy/image/build.sh makes.
        assert re.search(r"^ARG BASE=docker\.io/library/python:3\.11-slim$", text, re.M)
        assert re.search(r"^FROM \$\{BASE\}$", text, re.MULTILINE)
        assert re.search(r"^USER 10001$", text, re.MULTILINE)
        assert "HEALTHCHECK" in text
        assert "/healthz" in text
        assert 'VOLUME ["/var/lib/caliper-sidecar"]' in text
        for source in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
            for name in source.split():
                if name.startswith("build/"):  # the wheelhouse, which build.sh makes first
                    assert name in (DEPLOY / "image" / "build.sh").read_text(), name
                    continue
                assert (ROOT / name).exists(), name

    def test_dependencies_pinned_within_the_projects_ranges(self) -> None:
        """The image installs from deploy/constraints.txt, which pins every dependency (and
        the postgres extra's) to one version inside the range pyproject.toml allows."""
        text = (DEPLOY / "Containerfile").read_text()
        assert re.search(r"-c /tmp/wheels/constraints.txt \"caliper-sidecar\[postgres\]\"", text)
        pins = {
            canonicalize_name(name): Version(version)
            for name, version in re.findall(
                r"^([\w.-]+)==(\S+)$", (DEPLOY / "constraints.txt").read_text(), re.MULTILINE
            )
        }
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        wanted = [*project["dependencies"], *project["optional-dependencies"]["postgres"]]
        for line in wanted:
            requirement = Requirement(line)
            pinned = pins.get(canonicalize_name(requirement.name))
            assert pinned is not None, f"{requirement.name} is not pinned"
            assert requirement.specifier.contains(pinned), (requirement, pinned)


class TestCompose:
    def test_services_and_references(self, tmp_path: Path) -> None:
        compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
        services: dict[str, Any] = compose["services"]
        assert set(services) == {"app", "sidecar", "timeback"}
        for service in services.values():
            build = service["build"]
            assert (DEPLOY / "compose" / build["context"] / build["dockerfile"]).is_file()
            for secret in service.get("secrets", []):
                assert (DEPLOY / "compose" / compose["secrets"][secret]["file"]).is_file()
        env = sidecar_environment(services["sidecar"]["environment"], tmp_path)
        settings = load_settings(None, environ=env)
        # In the app's network namespace: loopback only, as in a pod; no tokens needed.
        assert services["sidecar"]["network_mode"] == "service:app"
        assert settings.receiver.host == "127.0.0.1"
        assert settings.receiver.tokens == ()
        assert settings.upstream.endpoint.startswith("http://timeback:8788/")
        assert services["app"]["environment"]["SIDECAR_URL"] == "http://127.0.0.1:8787"
        assert (DEPLOY / "compose" / "sample_app.py").is_file()


class TestKubernetes:
    @pytest.fixture
    def documents(self) -> dict[str, dict[str, Any]]:
        text = (DEPLOY / "kubernetes" / "caliper-sidecar.yaml").read_text()
        return {doc["kind"]: doc for doc in yaml.safe_load_all(text)}

    def test_sidecar_container(self, documents: dict[str, Any], tmp_path: Path) -> None:
        """A native sidecar: an init container that keeps running (restartPolicy Always),
        started before the app, stopped after it; a startup probe, and no readiness probe
        that could take the app's pod out of its Service."""
        deployment = documents["Deployment"]
        spec = deployment["spec"]["template"]["spec"]
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        assert [c["name"] for c in spec["containers"]] == ["app"]
        (sidecar,) = spec["initContainers"]
        assert sidecar["name"] == "caliper-sidecar"
        assert sidecar["restartPolicy"] == "Always"
        assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert "readinessProbe" not in sidecar
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        env = {e["name"]: e["value"] for e in sidecar["env"]}
        settings = load_settings(None, environ=sidecar_environment(env, tmp_path))
        assert settings.upstream.endpoint == "https://platform.timeback.com/caliper/v1p2"
        # Probes use the ops listener, by the port's name; the receiver stays on loopback.
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        assert ports["ops"] == settings.ops.port
        assert sidecar["startupProbe"]["httpGet"]["port"] == "ops"
        assert settings.receiver.host == "127.0.0.1"
        mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
        assert Path(env["SIDECAR_OUTBOX_PATH"]).parent == Path(mounts["outbox"])
        assert env["SIDECAR_OAUTH_CLIENT_SECRET_FILE"].startswith(mounts["timeback-client"])
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert (
            volumes["timeback-client"]["secret"]["secretName"]
            == (documents["Secret"]["metadata"]["name"])
        )
        assert (
            volumes["outbox"]["persistentVolumeClaim"]["claimName"]
            == (documents["PersistentVolumeClaim"]["metadata"]["name"])
        )
        assert spec["terminationGracePeriodSeconds"] > settings.upstream.timeout_s


class TestSystemd:
    UNIT = DEPLOY / "systemd" / "caliper-sidecar.service"

    def test_restart_always_and_state_directory(self) -> None:
        text = self.UNIT.read_text()
        assert "Restart=always" in text
        assert "StateDirectory=caliper-sidecar" in text
        assert "SIDECAR_OUTBOX_PATH=/var/lib/caliper-sidecar/" in text

    def test_a_wrong_configuration_is_not_restarted(self, tmp_path: Path) -> None:
        """`run` checks what check-config checks and exits 2; the unit does not restart on 2
        (an ExecStartPre failure would be restarted by Restart=always)."""
        text = self.UNIT.read_text()
        assert "RestartPreventExitStatus=2" in text
        assert "ExecStartPre=" not in text
        assert re.search(r"^ExecStart=\S+caliper-sidecar run -c ", text, re.MULTILINE)
        assert "ExecReload=/bin/kill -HUP $MAINPID" in text  # SIGHUP reloads
        config = tmp_path / "sidecar.toml"
        config.write_text('[receiver]\nhost = "0.0.0.0"\n')  # no tokens: refused
        config.chmod(0o600)
        result = subprocess.run(
            [sys.executable, "-m", "caliper_sidecar", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr

    def test_secrets_arrive_as_credentials(self, tmp_path: Path) -> None:
        """The client secret, the sender tokens and the admin token are LoadCredential= files,
        named to the sidecar through %d: with the credentials directory filled as systemd
        fills it, the relay's configuration loads with all three."""
        text = self.UNIT.read_text()
        credentials = dict(re.findall(r"^LoadCredential=([\w-]+):(\S+)$", text, re.MULTILINE))
        assert set(credentials) == {"client-secret", "tokens", "admin-token"}
        folder = tmp_path / "credentials"
        folder.mkdir()
        (folder / "client-secret").write_text("the-client-secret\n")
        (folder / "tokens").write_text("room-12 a-sender-token-of-room-12\n")
        (folder / "admin-token").write_text("an-admin-token-for-the-relay\n")
        env = dict(re.findall(r"^Environment=(SIDECAR_\w+)=(\S+)$", text, re.MULTILINE))
        env = {key: value.replace("%d", str(folder)) for key, value in env.items()}
        env["SIDECAR_OUTBOX_PATH"] = str(tmp_path / "outbox.db")
        config = tmp_path / "sidecar.toml"
        config.write_text(
            '[receiver]\nhost = "0.0.0.0"\n[upstream]\npreset = "timeback"\n'
            '[oauth]\nclient_id = "the-client"\n'
        )
        settings = load_settings(config, env)
        tokens = settings.receiver.tokens
        assert [getattr(t, "label", None) for t in tokens] == ["room-12"]
        assert settings.oauth.client_secret == "the-client-secret"
        assert settings.admin.token == "an-admin-token-for-the-relay"

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
    def test_hardened_to_an_exposure_of_1_2_at_most(self) -> None:
        """`systemd-analyze security` rates the unit's exposure 1.2 or less (0 is locked
        down, 10 is exposed)."""
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", str(self.UNIT)],
            capture_output=True,
            text=True,
            check=False,
        )
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert found is not None, result.stdout + result.stderr
        assert float(found.group(1)) <= 1.2, result.stdout

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
    def test_systemd_analyze_verify(self, tmp_path: Path) -> None:
        """The unit verifies, with ExecStart pointed at this checkout's command."""
        command = shutil.which("caliper-sidecar") or str(ROOT / ".venv/bin/caliper-sidecar")
        unit = tmp_path / "caliper-sidecar.service"
        unit.write_text(
            self.UNIT.read_text().replace("/opt/caliper-sidecar/bin/caliper-sidecar", command)
        )
        result = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
        )
        problems = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if "caliper-sidecar.service" in line
        ]
        assert result.returncode == 0, result.stderr
        assert problems == [], result.stdout + result.stderr


def test_kubernetes_validate_strict() -> None:
    """Every document of the sidecar's manifest validates strictly (no unknown property)
    against the Kubernetes API schemas of a version with native sidecars (the chart's are
    validated in test_helm.py)."""
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    if validate is None:
        pytest.skip("kubernetes-validate (the test extra) is not installed")
    result = subprocess.run(
        [
            validate,
            "--strict",
            "--kubernetes-version",
            "1.30.0",
            str(DEPLOY / "kubernetes" / "caliper-sidecar.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed for resource deployment/" in result.stdout + result.stderr


class TestGateway:
    """The PostgreSQL gateway: replicas sharing one outbox database."""

    def test_compose_replicas_share_a_postgres_outbox(self, tmp_path: Path) -> None:
        compose = yaml.safe_load((DEPLOY / "compose" / "gateway.yaml").read_text())
        services: dict[str, Any] = compose["services"]
        assert {"postgres", "sidecar-a", "sidecar-b", "timeback"} <= set(services)
        for name in ("sidecar-a", "sidecar-b"):
            replica = services[name]
            assert replica["depends_on"]["postgres"] == {"condition": "service_healthy"}
            for secret in replica["secrets"]:
                assert (DEPLOY / "compose" / compose["secrets"][secret]["file"]).is_file()
            env = sidecar_environment(replica["environment"], tmp_path)
            settings = load_settings(None, environ=env)
            assert settings.outbox.url  # from the secret file
            assert settings.upstream.jobs_url.endswith("/jobs/{id}/status")
        url = (DEPLOY / "compose" / compose["secrets"]["outbox_url"]["file"]).read_text()
        assert url.startswith("postgresql://sidecar:")
        assert "@postgres:5432/sidecar" in url


def test_kubernetes_pods_take_no_service_links() -> None:
    """The pods ask for no service-link variables (the sidecar ignores them, docs/operators.md)."""
    for document in yaml.safe_load_all(
        (DEPLOY / "kubernetes" / "caliper-sidecar.yaml").read_text()
    ):
        if document and document.get("kind") in ("Deployment", "StatefulSet"):
            assert document["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_prometheus_operator_monitors_scrape_the_ops_port() -> None:
    """The PodMonitor selects the sidecar's pods on the port named `ops`, which the pods
    declare and which serves /metrics without a token (the chart's: test_helm.py)."""
    monitors = {
        d["kind"]: d
        for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "monitoring.yaml").read_text())
    }
    pods = yaml.safe_load_all((DEPLOY / "kubernetes" / "caliper-sidecar.yaml").read_text())
    app = next(d for d in pods if d and d["kind"] == "Deployment")["spec"]["template"]
    assert (
        monitors["PodMonitor"]["spec"]["selector"]["matchLabels"].items()
        <= app["metadata"]["labels"].items()
    )
    containers = app["spec"]["containers"] + app["spec"].get("initContainers", [])
    ports = {p["name"] for c in containers for p in c.get("ports", [])}
    assert monitors["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] in ports
