"""The metrics registry: delivery series by destination, state read at scrape time."""

from __future__ import annotations

from caliper_sidecar.metrics import DestinationSnapshot, Metrics, Snapshot


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


class TestForDestination:
    def test_counts_under_its_name_only(self) -> None:
        """A destination's view counts its deliveries, dead letters, requests and in-flight
        events under its own `destination` label, never another's."""
        metrics = Metrics()
        lrs = metrics.for_destination("district-lrs")
        lrs.events_delivered.inc(3)
        lrs.events_dead_lettered.labels(reason="refused").inc()
        lrs.upstream_requests.labels(code="200").inc()
        lrs.upstream_seconds.observe(0.1)
        lrs.in_flight.inc(2)
        lrs.token_refreshes.inc()
        delivered = "caliper_sidecar_events_delivered_total"
        assert value(metrics, delivered, destination="district-lrs") == 3
        assert value(metrics, delivered, destination="upstream") == 0
        assert (
            value(
                metrics,
                "caliper_sidecar_events_dead_lettered_total",
                destination="district-lrs",
                reason="refused",
            )
            == 1
        )
        assert (
            value(
                metrics,
                "caliper_sidecar_upstream_requests_total",
                destination="district-lrs",
                code="200",
            )
            == 1
        )
        seconds = "caliper_sidecar_upstream_request_seconds_count"
        assert value(metrics, seconds, destination="district-lrs") == 1
        in_flight = "caliper_sidecar_events_in_flight"
        assert value(metrics, in_flight, destination="district-lrs") == 2
        refreshes = "caliper_sidecar_token_refreshes_total"
        assert value(metrics, refreshes, destination="district-lrs") == 1

    def test_the_same_view_for_the_same_name(self) -> None:
        """Asking twice for a destination gives the one view (its counters are not reset)."""
        metrics = Metrics()
        assert metrics.for_destination("archive") is metrics.for_destination("archive")

    def test_upstream_series_exist_from_the_start(self) -> None:
        """[upstream]'s delivered, dead-lettered (every reason), unconfirmed and in-flight
        series are exported at 0 before anything happens, so that alerts and rates see them."""
        text = Metrics().render()[0].decode()
        assert 'caliper_sidecar_events_delivered_total{destination="upstream"} 0.0' in text
        assert 'caliper_sidecar_events_unconfirmed_total{destination="upstream"} 0.0' in text
        assert 'caliper_sidecar_events_in_flight{destination="upstream"} 0.0' in text
        dead_lettered = "caliper_sidecar_events_dead_lettered_total"
        assert f'{dead_lettered}{{destination="upstream",reason="max_age"}} 0.0' in text

    def test_no_request_series_for_a_destination_that_makes_none(self) -> None:
        """Request durations and token refreshes appear when a client or a token source uses
        them: an archive exports none."""
        metrics = Metrics()
        metrics.for_destination("archive")
        text = metrics.render()[0].decode()
        assert 'caliper_sidecar_events_delivered_total{destination="archive"} 0.0' in text
        assert 'request_seconds_count{destination="archive"}' not in text
        assert 'token_refreshes_total{destination="archive"}' not in text


class TestState:
    def test_every_destination_has_its_state(self) -> None:
        """The state gauge says 1 for each destination's own state, [upstream] included; the
        token expiry is there for each destination that has a token."""
        metrics = Metrics()
        metrics.state.snapshot = Snapshot(
            upstream_state="ok",
            token_expires_at=1_700_000_000.0,
            destinations=(DestinationSnapshot("district-lrs", "auth_failed"),),
        )
        state = "caliper_sidecar_upstream_state"
        assert value(metrics, state, destination="upstream", state="ok") == 1
        assert value(metrics, state, destination="district-lrs", state="ok") == 0
        assert value(metrics, state, destination="district-lrs", state="auth_failed") == 1
        expiry = "caliper_sidecar_token_expiry_timestamp_seconds"
        assert value(metrics, expiry, destination="upstream") == 1_700_000_000.0
        assert value(metrics, expiry, destination="district-lrs") is None

    def test_no_expiry_without_a_token(self) -> None:
        """Without OAuth no expiry is exported, rather than a made-up one."""
        text = Metrics().render()[0].decode()
        assert "caliper_sidecar_token_expiry_timestamp_seconds{" not in text
