"""The split-on-refusal search and the refusal streak (caliper_sidecar/delivery/refusals.py), alone:
no outbox, no HTTP, no clock. A platform is a set of ids it refuses and the answer it refuses
them with; the search is driven as the dispatcher drives it."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from caliper_sidecar.delivery.refusals import REFUSING_AFTER, Refusals, SplitSearch, Verdict
from caliper_sidecar.exceptions import Refused


@dataclass(frozen=True)
class Event:
    id: str


def events(n: int) -> list[Event]:
    return [Event(f"e{i}") for i in range(n)]


def refusal(body: str = "no") -> Refused:
    return Refused(422, body)


@dataclass
class Outcome:
    accepted: list[str]
    dead: list[str]
    refusing: list[str] | None
    sends: int


def drive(
    batch: list[Event],
    refuse: dict[str, str],
    refusals: Refusals,
    now: float = 0.0,
) -> Outcome:
    """Send parts until the search ends, as the dispatcher does: a part holding a refused id
    is refused with the first such id's answer."""
    search = SplitSearch(batch, refusals)
    accepted: list[str] = []
    dead: list[str] = []
    sends = 0
    while (part := search.next_part()) is not None:
        sends += 1
        answers = [refuse[e.id] for e in part if e.id in refuse]
        if not answers:
            dead += [e.id for e, _ in search.accepted()]
            accepted += [e.id for e in part]
            continue
        verdict: Verdict[Event] | None = search.refused(part, refusal(answers[0]), now)
        if verdict is None:
            continue
        dead += [e.id for e, _ in verdict.dead]
        if verdict.refusing is not None:
            return Outcome(accepted, dead, [e.id for e in verdict.refusing], sends)
    dead += [e.id for e, _ in search.finished()]
    return Outcome(accepted, dead, None, sends)


class TestSplitSearch:
    def test_a_refused_event_is_isolated_and_its_batch_mates_accepted(self) -> None:
        """One bad event in 16: split until it is alone; it alone is refused, the 15 others
        are accepted, in a handful of sends rather than one per event."""
        outcome = drive(events(16), {"e5": "bad extension"}, Refusals(3600))
        assert outcome.dead == ["e5"]
        assert sorted(outcome.accepted) == sorted(e.id for e in events(16) if e.id != "e5")
        assert outcome.refusing is None
        assert outcome.sends <= 2 * 4 + 1

    def test_halves_go_first_so_receive_order_is_kept(self) -> None:
        """Accepted parts come out in receive order."""
        outcome = drive(events(10), {"e2": "x", "e7": "y"}, Refusals(3600))
        assert outcome.accepted == [e.id for e in events(10) if e.id not in ("e2", "e7")]

    def test_a_refusal_every_event_gets_stops_as_refusing(self) -> None:
        """REFUSING_AFTER single events refused with one answer: nothing is dead, every event
        without an outcome stays queued."""
        batch = events(40)
        outcome = drive(batch, {e.id: "unknown edApp" for e in batch}, Refusals(3600))
        assert outcome.dead == []
        assert outcome.refusing is not None
        assert len(outcome.refusing) + len(outcome.accepted) == 40

    def test_refusals_that_differ_are_the_events_own(self) -> None:
        """Refusals with different answers are each the event's own, however many."""
        batch = events(20)
        outcome = drive(batch, {e.id: f"bad {e.id}" for e in batch}, Refusals(3600))
        assert sorted(outcome.dead) == sorted(e.id for e in batch)
        assert outcome.refusing is None

    def test_a_few_refused_alike_are_dead(self) -> None:
        """Fewer than REFUSING_AFTER refused alike, with nothing to tell them apart by: the
        platform's word is taken."""
        batch = events(REFUSING_AFTER - 1)
        outcome = drive(batch, {e.id: "same" for e in batch}, Refusals(3600))
        assert sorted(outcome.dead) == sorted(e.id for e in batch)

    def test_the_same_refusal_past_the_grace_is_taken_at_its_word(self) -> None:
        """The streak outlives a batch; once the same refusal has lasted the grace, the events
        it refuses are dead."""
        refusals = Refusals(grace_s=60)
        first = events(REFUSING_AFTER)
        assert drive(first, {e.id: "same" for e in first}, refusals, now=0).refusing is not None
        later = [Event(f"later{i}") for i in range(3)]
        outcome = drive(later, {e.id: "same" for e in later}, refusals, now=61)
        assert sorted(outcome.dead) == sorted(e.id for e in later)
        assert outcome.refusing is None

    def test_an_accepted_event_ends_the_streak(self) -> None:
        """Refused alike, then one accepted: the streak starts again from nothing."""
        refusals = Refusals(3600)
        batch = events(REFUSING_AFTER - 1)
        drive(batch, {e.id: "same" for e in batch}, refusals)
        drive([Event("good")], {}, refusals)
        assert refusals.streak is None

    def test_unsettled_gives_back_what_has_no_outcome(self) -> None:
        """A failure or a shutdown in the middle of a search gives back every event without an
        outcome, once."""
        search = SplitSearch(events(4), Refusals(3600))
        part = search.next_part()
        assert part is not None
        assert search.refused(part, refusal(), 0) is None
        first = search.next_part()
        assert first is not None
        assert [e.id for e in search.unsettled()] == ["e2", "e3"]
        assert search.unsettled() == []
        assert search.next_part() is None


@given(
    size=st.integers(min_value=1, max_value=64),
    bad=st.sets(st.integers(min_value=0, max_value=63)),
    alike=st.booleans(),
)
def test_every_event_ends_accepted_dead_or_queued_once(
    size: int, bad: set[int], alike: bool
) -> None:
    """Whatever the platform refuses: each event of the batch ends exactly once accepted,
    dead or still queued (refusing), and only refused events are ever dead."""
    batch = events(size)
    refuse = {f"e{i}": ("same" if alike else f"bad {i}") for i in bad if i < size}
    outcome = drive(batch, refuse, Refusals(3600))
    ended = outcome.accepted + outcome.dead + (outcome.refusing or [])
    assert sorted(ended) == sorted(e.id for e in batch)
    assert set(outcome.dead) <= set(refuse)
    assert not set(outcome.accepted) & set(refuse)
