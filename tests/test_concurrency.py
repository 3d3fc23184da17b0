"""The adaptive concurrency's decisions (delivery/concurrency.py), with no network and no clock
but the one the tests pass in: the limit stays within [1, ceiling] whatever happens; it rises
while the RTT holds and the limit is used; it falls on back-pressure and on a rising RTT; and
against a simulated platform of limited capacity it settles near that capacity, with no 429s,
where Vector's rules alone (the unloaded RTT left out) climb into them."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caliper_sidecar.delivery import concurrency
from caliper_sidecar.delivery.concurrency import MIN_SAMPLES, START, AdaptiveConcurrency

#: 1/16 s: a power of two, so that the tests' clock adds up exactly (with 0.05, a period that
#: should end as a round's answers come ends 1e-17 s after them, and they count in the next)
RTT = 0.0625


def rounds(
    limits: AdaptiveConcurrency,
    count: int,
    rtt: float | None = RTT,
    *,
    back_pressure: bool = False,
    now: float = 0.0,
) -> float:
    """`count` rounds in which the limit is used to the full: as many sends as it allows go
    out at once and are answered together after `rtt` (a failure without an RTT when None).
    Returns the clock after the last round."""
    for _ in range(count):
        generations = [limits.started(n + 1) for n in range(limits.limit)]
        now += rtt or RTT
        for generation in generations:
            limits.answered(now, generation, rtt, back_pressure=back_pressure)
    return now


class TestRises:
    def test_it_starts_at_one(self) -> None:
        assert AdaptiveConcurrency(32, now=0).limit == START == 1
        assert AdaptiveConcurrency(1, now=0).limit == 1

    def test_a_flat_rtt_and_a_used_limit_rise_to_the_ceiling_and_stay(self) -> None:
        limits = AdaptiveConcurrency(8, now=0)
        seen = [limits.limit]
        now = 0.0
        for _ in range(40):
            now = rounds(limits, 1, now=now)
            seen.append(limits.limit)
        assert seen == sorted(seen)  # only ever up
        assert seen[-1] == 8
        assert seen[-20:] == [8] * 20  # and there it stays, never over

    @given(
        ceiling=st.integers(1, 24),
        jitter=st.lists(st.floats(0.0, 0.03), min_size=40, max_size=40),
    )
    def test_it_rises_while_the_rtt_holds(self, ceiling: int, jitter: list[float]) -> None:
        """An RTT within 3% of itself (a platform that is not loaded, answering with some
        jitter) and the limit used: the limit reaches the ceiling."""
        limits = AdaptiveConcurrency(ceiling, now=0)
        now = 0.0
        for rounds_done in itertools.count():
            noise = jitter[rounds_done % len(jitter)]
            now = rounds(limits, 1, RTT * (1 + noise), now=now)
            if limits.limit == ceiling or rounds_done > 8 * ceiling + 3 * MIN_SAMPLES:
                break
        assert limits.limit == ceiling

    def test_an_unused_limit_does_not_rise(self) -> None:
        """A trickle (one send at a time under a limit of 2) is no evidence that more would
        be used: the limit stays."""
        limits = AdaptiveConcurrency(8, now=0)
        now = rounds(limits, 2 * MIN_SAMPLES)
        assert limits.limit == 2
        for _ in range(30):
            generation = limits.started(1)
            now += RTT
            limits.answered(now, generation, RTT, back_pressure=False)
        assert limits.limit == 2


class TestFalls:
    def at_ceiling(self, ceiling: int = 16) -> tuple[AdaptiveConcurrency, float]:
        limits = AdaptiveConcurrency(ceiling, now=0)
        now = rounds(limits, 3 * ceiling)
        assert limits.limit == ceiling
        return limits, now

    @pytest.mark.parametrize("rtt", [RTT, None])
    def test_back_pressure_brings_it_down_to_one(self, rtt: float | None) -> None:
        """429s, 503s, timeouts (answered with or without an RTT): the limit falls by a tenth
        a period, down to 1 and no lower."""
        limits, now = self.at_ceiling()
        seen = [limits.limit]
        for _ in range(40):
            now = rounds(limits, 1, rtt, back_pressure=True, now=now)
            seen.append(limits.limit)
        assert seen[1] == math.floor(16 * concurrency.DECREASE_RATIO)  # 14
        assert seen == sorted(seen, reverse=True)
        assert seen[-1] == 1

    def test_a_rising_rtt_brings_it_down(self) -> None:
        """The RTT doubles (the platform is loaded, by us or by others) and stays there: the
        limit falls, and all the way to 1, where it is measured again and rises from."""
        limits, now = self.at_ceiling()
        seen = []
        for _ in range(40):
            now = rounds(limits, 1, 2 * RTT, now=now)
            seen.append(limits.limit)
        assert seen[1] < 16  # the first period still holds answers of the round before
        assert 1 in seen
        # At 1 the doubled RTT is the platform's own: the unloaded RTT moves to it, and the
        # limit climbs again.
        for _ in range(200):
            now = rounds(limits, 1, 2 * RTT, now=now)
        assert limits.limit == 16

    def test_a_slow_creep_of_the_rtt_brings_it_down(self) -> None:
        """An RTT that rises 2% a period never rises fast against its weighted past (Vector's
        test), but rises against the unloaded RTT: the limit falls."""
        limits, now = self.at_ceiling()
        rtt = RTT
        for _ in range(30):
            rtt *= 1.02
            now = rounds(limits, 1, rtt, now=now)
        assert limits.limit < 16

    def test_answers_to_sends_of_a_lowered_limit_do_not_lower_it_again(self) -> None:
        """After a decrease, the answers still coming are those of the limit before: their
        back-pressure was paid for once."""
        limits, now = self.at_ceiling()
        old = [limits.started(n + 1) for n in range(16)]
        now += RTT
        limits.answered(now, old[0], None, back_pressure=True)  # the period's verdict: 14
        assert limits.limit == 14
        for generation in old[1:]:
            now += RTT  # each later than a period
            limits.answered(now, generation, None, back_pressure=True)
        assert limits.limit == 14


class TestBounds:
    @settings(max_examples=300)
    @given(
        ceiling=st.integers(1, 64),
        steps=st.lists(
            st.one_of(
                st.tuples(st.just("start")),
                st.tuples(
                    st.just("answer"),
                    st.integers(0, 1000),  # which send of those out
                    st.floats(0, 1),  # time passed
                    st.one_of(st.none(), st.floats(0.001, 10)),  # its RTT
                    st.booleans(),  # back-pressure
                ),
                st.tuples(st.just("retune"), st.integers(1, 64)),
            ),
            max_size=300,
        ),
    )
    def test_the_limit_stays_within_one_and_the_ceiling(
        self, ceiling: int, steps: list[tuple[object, ...]]
    ) -> None:
        limits = AdaptiveConcurrency(ceiling, now=0)
        out: list[int] = []
        now = 0.0
        for step in steps:
            if step[0] == "start":
                out.append(limits.started(len(out) + 1))
            elif step[0] == "answer" and out:
                _, which, passed, rtt, pushed_back = step
                assert isinstance(which, int)
                assert isinstance(passed, float)
                assert rtt is None or isinstance(rtt, float)
                now += passed
                change = limits.answered(
                    now, out.pop(which % len(out)), rtt, back_pressure=bool(pushed_back)
                )
                assert change <= 1
            elif step[0] == "retune":
                assert isinstance(step[1], int)
                limits.retune(step[1])
                assert limits.ceiling == step[1]
            assert 1 <= limits.limit <= limits.ceiling

    def test_a_lowered_ceiling_cuts_the_limit_at_once_a_raised_one_lets_it_rise(self) -> None:
        limits = AdaptiveConcurrency(8, now=0)
        now = rounds(limits, 30)
        assert limits.limit == 8
        limits.retune(3)
        assert limits.limit == 3
        limits.retune(6)
        assert limits.limit == 3  # not a jump: it rises as the platform allows
        rounds(limits, 30, now=now)
        assert limits.limit == 6

    def test_a_ceiling_under_one_is_refused(self) -> None:
        with pytest.raises(ValueError, match="at least 1"):
            AdaptiveConcurrency(0, now=0)
        with pytest.raises(ValueError, match="at least 1"):
            AdaptiveConcurrency(4, now=0).retune(0)


# -- a simulated platform ------------------------------------------------------------------


class Limits(Protocol):
    limit: int

    def started(self, in_flight: int) -> int: ...

    def answered(
        self, now: float, generation: int, rtt_s: float | None, *, back_pressure: bool
    ) -> int: ...


class Fixed:
    """A fixed concurrency, as before issue 33."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def started(self, in_flight: int) -> int:
        return 0

    def answered(
        self, now: float, generation: int, rtt_s: float | None, *, back_pressure: bool
    ) -> int:
        return 0


@dataclass
class Platform:
    """A platform that serves `capacity` requests at once, each in `latency` (jittered by a
    log-normal `jitter`), queues `queue` more (their latency rises: they wait their turn), and
    answers 429 at once past that; and a sender that keeps as many requests out as the limit
    allows and, after a 429, holds everything for `backoff` and then sends one probe (the
    dispatcher's circuit). A discrete-event simulation: its clock is its own."""

    capacity: int
    queue: int
    latency: float = RTT
    jitter: float = 0.1
    backoff: float = 1.0
    seed: int = 1
    answered_429: int = 0
    #: the limit, sampled every tenth of a simulated second
    limits: list[int] = field(default_factory=list)

    def drain(self, limits: Limits, requests: int) -> float:
        """Send `requests` requests through it; returns the simulated time it took."""
        rng = random.Random(self.seed)
        events: list[tuple[float, int, str, int]] = []  # (time, order, what, request)
        order = itertools.count()
        ids = itertools.count(1)
        started: dict[int, tuple[float, int]] = {}
        waiting: list[int] = []
        now, out, sent, done, serving, at_platform = 0.0, 0, 0, 0, 0, 0
        closed_at, probing, sampled = 0.0, False, 0.0

        def schedule(at: float, what: str, request: int) -> None:
            heapq.heappush(events, (at, next(order), what, request))

        def service() -> float:
            return self.latency * math.exp(rng.gauss(0, self.jitter))

        def send_more() -> None:
            nonlocal out, sent, probing
            while out < limits.limit and sent < requests and now >= closed_at:
                if probing:
                    return  # the probe is out: the rest wait for its answer
                if closed_at:
                    probing = True
                out += 1
                sent += 1
                request = next(ids)
                started[request] = (now, limits.started(out))
                schedule(now + 0.001 * rng.random(), "arrive", request)

        send_more()
        while done < requests:
            now, _, what, request = heapq.heappop(events)
            if what == "arrive":
                if at_platform >= self.capacity + self.queue:
                    schedule(now + 0.001, "429", request)
                else:
                    at_platform += 1
                    if serving < self.capacity:
                        serving += 1
                        schedule(now + service(), "served", request)
                    else:
                        waiting.append(request)
            elif what == "served":
                at_platform -= 1
                if waiting:
                    schedule(now + service(), "served", waiting.pop(0))
                else:
                    serving -= 1
                schedule(now + 0.001 * rng.random(), "ok", request)
            elif what == "ok":
                out, done = out - 1, done + 1
                began, generation = started.pop(request)
                limits.answered(now, generation, now - began, back_pressure=False)
                closed_at, probing = 0.0, False
            elif what == "429":
                out, sent = out - 1, sent - 1  # to be sent again
                self.answered_429 += 1
                _, generation = started.pop(request)
                limits.answered(now, generation, None, back_pressure=True)
                closed_at, probing = max(closed_at, now + self.backoff), False
                schedule(closed_at, "reopen", 0)
            send_more()
            while now >= sampled:
                self.limits.append(limits.limit)
                sampled += 0.1
        return now

    def settled(self) -> list[int]:
        """The limit over the second half of the drain."""
        return self.limits[len(self.limits) // 2 :]


@pytest.mark.parametrize("capacity", [1, 2, 4, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_it_settles_near_a_platforms_capacity_without_429s(capacity: int, seed: int) -> None:
    """A platform that serves `capacity` at once and queues as many more; a ceiling of 32 and
    2,000 requests: no 429, the limit settles at or a little over the capacity (its median
    over the second half within [capacity, 1.25 capacity + 1]), and the drain takes within
    1.2 times the time of the best fixed concurrency."""
    platform = Platform(capacity, queue=capacity, seed=seed)
    took = platform.drain(AdaptiveConcurrency(32, now=0), 2000)
    assert platform.answered_429 == 0
    settled = sorted(platform.settled())
    median = settled[len(settled) // 2]
    assert capacity <= median <= 1.25 * capacity + 1, settled
    best = min(
        Platform(capacity, queue=capacity, seed=seed).drain(Fixed(fixed), 2000)
        for fixed in (1, 2, 4, 8, 16, 32)
    )
    assert took <= 1.2 * best


def test_it_reaches_the_ceiling_of_a_platform_that_takes_everything() -> None:
    platform = Platform(capacity=1000, queue=0)
    platform.drain(AdaptiveConcurrency(32, now=0), 4000)
    settled = sorted(platform.settled())
    assert settled[len(settled) // 2] == 32, settled
    assert settled[0] >= 32 * concurrency.DECREASE_RATIO**3  # now and then jitter reads as load


def test_vectors_rules_alone_climb_into_the_429s(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same platform of capacity 4 with the unloaded RTT left out of the decisions (what
    Vector's ARC decides by): the limit climbs to where the platform's queue is full and meets
    429s, over and over. The test above fails without what this leaves out."""
    monkeypatch.setattr(concurrency, "HOLDS", math.inf)
    monkeypatch.setattr(concurrency, "RISEN", math.inf)
    platform = Platform(capacity=4, queue=4)
    platform.drain(AdaptiveConcurrency(32, now=0), 2000)
    assert platform.answered_429 > 20
    assert max(platform.settled()) >= 8
