"""The shipped alert rules and dashboard: valid, and about metrics the sidecar really exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import msgspec
import pytest
import yaml

from caliper_sidecar.app import Sidecar
from caliper_sidecar.config import DestinationSettings, Settings
from caliper_sidecar.metrics import Metrics, Snapshot
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import make_events, settings_for
from .installs import apt_install

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "caliper-sidecar.json"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
METRIC = re.compile(r"\bcaliper_sidecar_[a-z_]+")


@pytest.fixture
def settings(platform: RunningFake, tmp_path: Path) -> Settings:
    """A sidecar with an archive destination: the destinations' own series are exported only
    where there are destinations."""
    archive = DestinationSettings(name="archive", kind="archive", dir=str(tmp_path / "archive"))
    return msgspec.structs.replace(settings_for(platform, tmp_path), destinations=(archive,))


@pytest.fixture(scope="session")
def promtool() -> str:
    """Debian's promtool (package prometheus), installed with apt when missing and root."""
    if not shutil.which("promtool") and os.geteuid() == 0 and shutil.which("apt-get"):
        apt_install("prometheus", recommends=False)
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed and could not be")
    return found


def queried_metrics() -> set[str]:
    expressions = [
        rule["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for rule in g["rules"]
    ]
    dashboard = json.loads(DASHBOARD.read_text())
    expressions += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {name for e in expressions for name in METRIC.findall(e)}


def test_alert_rules_pass_promtool(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_dashboard_parses() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]


async def test_every_queried_metric_is_exported(sidecar: Sidecar, fake: object) -> None:
    """Each metric an alert or a panel asks for is in a live sidecar's /metrics (a histogram
    through its _bucket series)."""
    async with aiohttp.ClientSession(base_url=sidecar.url) as client:
        async with client.post("/v1/events", json=make_events(2)) as resp:
            assert resp.status == 202
        await fake.wait_for(2)  # type: ignore[attr-defined]
        async with client.get("/metrics") as resp:
            text = await resp.text()
    exported = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")
    }
    queried = queried_metrics()
    assert len(queried) > 10  # the alerts and the panels ask for many
    missing = sorted(name for name in queried if name not in exported)
    assert not missing, missing


def test_dashboard_selects_job_and_instance() -> None:
    """A fleet of relays in one Prometheus: the dashboard has job and instance variables, and
    every query is narrowed by both."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"job", "instance"} <= variables
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for found in METRIC.finditer(target["expr"]):
                selector = target["expr"][found.end() :]
                assert selector.startswith('{job=~"$job",instance=~"$instance"'), target["expr"]


async def test_the_docs_list_every_metric_exported(sidecar: Sidecar, fake: object) -> None:
    """Every `caliper_sidecar_*` family a live sidecar exports (once it has a token) is named
    in the docs, and the docs name no metric that does not exist."""
    async with aiohttp.ClientSession(base_url=sidecar.url) as client:
        async with client.post("/v1/events", json=make_events(1)) as resp:
            assert resp.status == 202
        await fake.wait_for(1)  # type: ignore[attr-defined]
        async with client.get("/metrics") as resp:
            text = await resp.text()
    exported = set(re.findall(r"^# TYPE (caliper_sidecar_\w+) ", text, re.MULTILINE))
    text = "\n".join(page.read_text() for page in DOCS)
    written = set(re.findall(r"\b(caliper_sidecar_[a-z_]+[a-z])\b", text))
    unwritten, unknown = sorted(exported - written), sorted(written - exported)
    assert not unwritten, unwritten
    assert not unknown, unknown


def delivery_series() -> set[str]:
    """The series that carry a `destination` label, as a sidecar exports them."""
    metrics = Metrics()
    metrics.state.snapshot = Snapshot(token_expires_at=1.0)
    upstream = metrics.for_destination("upstream")
    upstream.upstream_requests.labels(code="200").inc()
    upstream.upstream_seconds.observe(0.1)
    upstream.token_refreshes.inc()
    return {
        re.sub(r"_(bucket|count|sum)$", "", sample.name)
        for family in metrics.registry.collect()
        for sample in family.samples
        if "destination" in sample.labels
    }


def test_delivery_alerts_name_their_destination() -> None:
    """An alert on a delivery series fires per destination and says which: every aggregation
    keeps `destination`, and the summary names it."""
    series = delivery_series()
    assert "caliper_sidecar_upstream_requests_total" in series
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    delivery = [r for r in rules if set(METRIC.findall(r["expr"])) & series]
    assert len(delivery) >= 8
    for rule in delivery:
        assert "{{ $labels.destination }}" in rule["annotations"]["summary"], rule["alert"]
        for grouping in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            assert "destination" in grouping.split(", "), rule["alert"]


def test_dashboard_keeps_destinations_apart() -> None:
    """Every panel aggregating a delivery series keeps `destination` in its grouping and its
    legend."""
    series = delivery_series()
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            if not set(METRIC.findall(target["expr"])) & series:
                continue
            assert "{{destination}}" in target["legendFormat"], target["expr"]
            for grouping in re.findall(r"\bby \(([^)]*)\)", target["expr"]):
                assert "destination" in grouping.split(", "), target["expr"]
