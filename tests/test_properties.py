"""Properties over the input space: whatever an app sends, mutated from the events real apps
and the IMS fixtures send, the answer is 202, 400, 413 or 422, never a 5xx, and what was
accepted is forwarded unchanged (docs/app-developers.md, docs/guarantees.md)."""

from __future__ import annotations

import copy
import json
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caliper_sidecar.app import Sidecar
from caliper_sidecar.tools.samples import sample_events
from caliper_sidecar.validation import validate_events

from .conftest import SHARED, new_id, sdk_events

FIXTURES = SHARED / "caliper-fixtures" / "v1p2"
ANSWERS = {202, 400, 413, 422}


def fixture_events() -> list[dict[str, Any]]:
    """The IMS example events (empty when ../shared is absent: the other seeds remain)."""
    if not FIXTURES.is_dir():
        return []
    events = []
    for path in sorted(FIXTURES.glob("caliperEvent*.json")):
        document = json.loads(path.read_text())
        if isinstance(document, dict) and "action" in document:
            events.append(document)
    return events


SEEDS: list[dict[str, Any]] = [*sample_events(), *sdk_events(), *fixture_events()]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["Active", "Learner", "urn:uuid:x", "2024-01-15T10:00:00.000Z", ""]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a JSON value, as a path of keys and indexes."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


@st.composite
def mutated_events(draw: st.DrawFn) -> dict[str, Any]:
    """A seed event with one to three of its places replaced, deleted or given a new key."""
    event: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    event["id"] = new_id()
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(event)[1:]))
        parent: Any = event
        for part in where[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[where[-1]] = draw(json_values)
        elif action == "delete":
            del parent[where[-1]]
        elif isinstance(parent[where[-1]], dict):
            parent[where[-1]][draw(st.text(max_size=8))] = draw(json_values)
        if not isinstance(event, dict) or "id" not in event:
            break
    return event


class TestNeverA5xx:
    @settings(max_examples=300, deadline=None)
    @given(mutated_events())
    def test_validator_never_raises(self, event: dict[str, Any]) -> None:
        """The validator judges anything; it never raises (a raise was a 500)."""
        for profile in ("timeback", "timeback-learnwith", "caliper"):
            validate_events([event], profile=profile)

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(event=mutated_events())
    async def test_ingest_answers_4xx_or_202(
        self, client: aiohttp.ClientSession, sidecar: Sidecar, event: dict[str, Any]
    ) -> None:
        """Over real HTTP: every mutated event is accepted or refused with a reason."""
        # What is stored is read from the outbox: the dispatcher must not take it first.
        await sidecar.dispatcher.stop(grace_s=0)
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status in ANSWERS, await resp.text()
            body = await resp.json()
        if resp.status == 202 and body["accepted"]:
            batch = await sidecar.outbox.claim_batch(1000, 10**9)
            stored = batch.events
            await sidecar.outbox.release(batch.claim, batch.seqs)
            mine = [e for e in stored if json.loads(e.body).get("id") == event["id"]]
            assert mine, "accepted but not stored"
            assert json.loads(mine[0].body) == event  # stored as received


def test_seeds_are_there() -> None:
    """The property tests mutate real events: the seed samples and the SDK's at least."""
    assert len(SEEDS) >= len(sample_events()) + len(sdk_events())
    if not FIXTURES.is_dir():
        pytest.skip("../shared is absent: the IMS fixtures are not among the seeds")
    assert fixture_events()
