"""Batching: which of the oldest waiting events go out together in one envelope. Both backends
claim the oldest unclaimed rows and keep what this says fits."""

from __future__ import annotations

from collections.abc import Sequence

from caliper_sidecar.outbox.records import StoredEvent


def fill_batch(
    rows: Sequence[StoredEvent], max_events: int, max_bytes: int
) -> tuple[list[StoredEvent], bool]:
    """The oldest rows of the oldest one's sensor that fit both limits (at least one), and
    whether a limit (or events of another sensor waiting behind) ended them. An envelope
    carries one sensor: batches never mix the apps that sent their events."""
    events: list[StoredEvent] = []
    used = 0
    sensor = rows[0].sensor if rows else None
    other_sensor = False
    for row in rows:
        if row.sensor != sensor:
            other_sensor = True
            continue
        cost = len(row.body) + (1 if events else 0)  # the comma between events
        if events and used + cost > max_bytes:
            return events, True
        used += cost
        events.append(row)
    return events, other_sensor or len(rows) >= max_events
