"""How many envelopes a destination keeps in flight: an adaptive limit under its configured
`concurrency`, which is the ceiling (issue 33). Pure: the caller passes the clock in and says
what each send met; the dispatcher enforces the limit.

The algorithm is Vector's adaptive request concurrency (ARC), TCP's congestion control applied
to requests: additive increase, multiplicative decrease. Each answer's round-trip time (RTT)
is measured and time is cut into periods of about one past RTT. At the end of each, with
`current` the mean RTT of the period's answers:

- **decrease**, `limit = max(1, floor(limit * DECREASE_RATIO))`, when the period met
  back-pressure (429, 503 and the other transient answers, a timeout, a connection that
  failed), or its RTT rose: above the past RTT by more than its noise (Vector's test), or
  above the destination's unloaded RTT by RISEN;
- **increase**, `limit += 1` up to the ceiling, when the limit was reached (a send waited for
  it: there is evidence that more would be used) and the RTT holds: within HOLDS of the
  unloaded RTT;
- otherwise the limit holds.

The past RTT is an exponentially weighted mean of the periods' RTTs and of their deviation, so
that "rose" adapts to how noisy a destination is. On its own (Vector's ARC) it lets the limit
creep past a destination's capacity: each request more than it serves at once waits in its
queue and adds 1/capacity to the RTT, which the weighted mean soon takes for the new normal, so
that the next noisy period under it raises the limit again, until the destination answers 429.
Simulated against a platform that serves 4 at once and queues 4 more (tests/test_concurrency.py
has it), Vector's rules alone climbed to 8 and met 429s, and the backoff they open, over and
over. So the RTT is also held against the unloaded RTT, as TCP Vegas and Netflix's
concurrency-limits do (`_unloaded`).

Two more things are not Vector's, both for the same reason, that a period's verdict must be
about the limit it judges. A period judges only the sends that started under that limit
(`started` returns the limit's generation and `answered` takes it back): right after a change,
the answers still coming are those of the limit before, and after a decrease they would lower
it again for what it already paid for. And a period lasts until it has MIN_SAMPLES RTTs: at a
limit of 1 or 2 one RTT is one or two answers, and one lucky answer would read as room for one
more.

The rest that is not Vector's is said where it is done: the start (START), floors under the
noise (MIN_RISE, and JITTER_S for the sidecar's own), and what a change of ceiling does
(`retune`).
"""

from __future__ import annotations

import math
from typing import Final

#: the factor a decrease multiplies the limit by. Vector's, chosen by its simulations: it keeps
#: concurrency high without holding it high when the destination pushes back
DECREASE_RATIO: Final = 0.9
#: the weight of the newest period in the past RTT's mean and deviation. Vector's: quick to
#: follow a change without chasing one slow period
EWMA_ALPHA: Final = 0.4
#: how many deviations above the past mean an RTT must rise to count as rising. Vector's: a
#: noisy destination's jitter does not read as load
RTT_DEVIATION_SCALE: Final = 2.5
#: nor does a rise smaller than this share of the past mean. Not Vector's: after one period the
#: deviation is 0, and a destination with a very steady RTT has next to none, so any jitter
#: (the sidecar's own event loop) would read as rising
MIN_RISE: Final = 0.05
#: the weight of the newest period in the slower average whose lowest value is the unloaded
#: RTT: the lowest single period would be the luckiest one, under the RTT a destination
#: really answers in, and every period after it would read as loaded
BASE_ALPHA: Final = 0.1
#: the RTT holds while within this share above the unloaded RTT, and has risen past RISEN. One
#: request more than a destination's capacity waits in its queue and adds 1/capacity to the
#: RTT: at a capacity of 4 that is 25%, past RISEN, and the limit goes back to 4; at 16 it is
#: 6%, and 12.5% for two more, where the limit stops rising. So the limit settles at or a
#: little over the capacity, the destination kept busy (what waits in its queue costs no
#: throughput) and far from its 429s, while jitter of a few percent reads as neither
HOLDS: Final = 0.10
RISEN: Final = 0.20
#: and no rise under this many seconds counts, nor one under twice it as risen: the sidecar's
#: own event loop, busy claiming, sending and acknowledging, answers its sockets a few
#: milliseconds late, which beside a destination that answers in 1 ms (a gateway on the LAN,
#: the fake on loopback) is a rise of several times; measured, the relative tests alone held
#: the limit at 1 or 2 there, and drained a backlog up to 1.4 times slower than a fixed 4.
#: Beside a destination of 50 ms or more it is under HOLDS and changes nothing
JITTER_S: Final = 0.005
#: where the limit starts (at most the ceiling): at 1, as Vector's. Every later decision is
#: measured against the unloaded RTT, which is only measured unloaded where nothing of ours
#: waits behind anything else of ours: a start at the old fixed 4 against a platform that
#: takes 1 or 2 at once would take its queue for its speed. Climbing to 4 takes about six
#: RTTs, a fraction of a second, nothing against a backlog; and a restart never opens with a
#: burst at a platform that may be recovering from what made the backlog
START: Final = 1
#: the RTTs a period needs before its verdict (back-pressure needs none)
MIN_SAMPLES: Final = 3


class _PastRtt:
    """The exponentially weighted mean of the periods' RTTs, and their variance (the
    incremental form: each new value moves the mean by `alpha` of its difference)."""

    __slots__ = ("mean", "variance")

    def __init__(self, first: float) -> None:
        self.mean = first
        self.variance = 0.0

    def update(self, value: float) -> None:
        difference = value - self.mean
        increment = EWMA_ALPHA * difference
        self.mean += increment
        self.variance = (1 - EWMA_ALPHA) * (self.variance + difference * increment)

    @property
    def deviation(self) -> float:
        return math.sqrt(self.variance)


class AdaptiveConcurrency:
    """One destination's limit on sends in flight, between 1 and `ceiling`.

    The dispatcher calls `started` when a send goes out (with how many are out, counting it)
    and `answered` when it ends, with what `started` returned; `limit` is how many may be out
    at once. Times are in seconds on one monotonic clock, passed in.
    """

    def __init__(self, ceiling: int, now: float) -> None:
        _check(ceiling)
        self.ceiling = ceiling
        self.limit = min(ceiling, START)
        #: the unloaded RTT (None before the second period)
        self.base_rtt_s: float | None = None
        self._past: _PastRtt | None = None
        self._slow = 0.0  # the slower average of the periods' RTTs
        self._periods = 0  # periods with an RTT measured, the first one's not counted
        # each change of the limit starts a generation; the sends of one started before the
        # last decrease say nothing about the limit now
        self._generation = 0
        self._decreased_in = 0
        self._period_ends = now
        # this period's RTTs (their sum and count), and what it met
        self._rtt_sum = 0.0
        self._rtt_count = 0
        self._back_pressure = False
        self._reached = False

    @property
    def past_rtt_s(self) -> float | None:
        """The past RTT's weighted mean (None before the first answer)."""
        return None if self._past is None else self._past.mean

    def started(self, in_flight: int) -> int:
        """A send went out; `in_flight` sends are out now, counting it. Returns the limit's
        generation, for `answered`."""
        if in_flight >= self.limit:
            self._reached = True
        return self._generation

    def answered(
        self, now: float, generation: int, rtt_s: float | None, *, back_pressure: bool
    ) -> int:
        """A send that `started` in `generation` ended at `now`: `rtt_s` is its round trip when
        the destination took it (None when it did not: the time a refusal or a failure took
        says nothing of the load a delivery carries), and `back_pressure` whether the answer
        said "too much" (429, 503, a timeout, a failed connection). Returns how the limit
        changed (+1, a negative step, or 0)."""
        if generation < self._decreased_in:
            return 0  # started under a limit since lowered: that one was paid for
        if back_pressure:
            self._back_pressure = True
        if rtt_s is not None and generation == self._generation:
            self._rtt_sum += rtt_s
            self._rtt_count += 1
        past = self._past
        if past is None:
            if self._rtt_count < MIN_SAMPLES:
                return 0
            # The first RTTs are the first past: the periods start from them. Nothing is
            # decided before (the limit is where it starts, START). They are not the first
            # unloaded RTT either: the first send also fetched a token and opened a connection.
            first = self._rtt_sum / self._rtt_count
            self._past = _PastRtt(first)
            self._slow = first
            self._next_period(now, first)
            return 0
        if now < self._period_ends or (self._rtt_count < MIN_SAMPLES and not self._back_pressure):
            return 0
        change = 0
        if not self._rtt_count:
            change = self._decrease()  # back-pressure, and nothing taken
        else:
            current = self._rtt_sum / self._rtt_count
            base = self._unloaded(current)
            rising = current >= past.mean + max(
                RTT_DEVIATION_SCALE * past.deviation, MIN_RISE * past.mean, JITTER_S
            )
            risen = current >= base + max(RISEN * base, 2 * JITTER_S)
            if self._back_pressure or rising or risen:
                change = self._decrease()
            elif self._reached and current <= base + max(HOLDS * base, JITTER_S):
                change = self._increase()
            past.update(current)
        self._next_period(now, past.mean)
        return change

    def retune(self, ceiling: int) -> None:
        """A new ceiling (SIGHUP). Lowered, the limit is cut to it at once; raised, the limit
        rises to it as the destination allows."""
        _check(ceiling)
        self.ceiling = ceiling
        if self.limit > ceiling:
            self.limit = ceiling
            self._generation += 1
            self._decreased_in = self._generation

    def _unloaded(self, current: float) -> float:
        """The unloaded RTT, this period's RTT counted: the lowest a slower average of the
        periods' RTTs has been (its first ten periods a plain mean, not weighted toward the
        first one).

        It is followed up only where that cannot be our load: at a limit of 1, an RTT that
        does not hold moves it a tenth of the way there. A destination whose RTT rose for
        good, not by our load, brings the limit down to 1, is measured again there, and the
        limit climbs from it; one that answers in bursts moves it a little, now and then.
        """
        self._periods += 1
        self._slow += max(BASE_ALPHA, 1 / self._periods) * (current - self._slow)
        base = self._slow if self.base_rtt_s is None else min(self.base_rtt_s, self._slow)
        if self.limit == 1 and current > base + max(HOLDS * base, JITTER_S):
            base += BASE_ALPHA * (current - base)
        self.base_rtt_s = base
        return base

    def _increase(self) -> int:
        if self.limit >= self.ceiling:
            return 0
        self.limit += 1
        self._generation += 1
        return 1

    def _decrease(self) -> int:
        lowered = max(1, math.floor(self.limit * DECREASE_RATIO))
        change = lowered - self.limit
        if change:
            self.limit = lowered
            self._generation += 1
            self._decreased_in = self._generation
        return change

    def _next_period(self, now: float, past_rtt: float) -> None:
        """The next period: one past RTT long, as Vector's."""
        self._period_ends = now + past_rtt
        self._rtt_sum, self._rtt_count = 0.0, 0
        self._back_pressure = self._reached = False


def _check(ceiling: int) -> None:
    if ceiling < 1:
        raise ValueError(f"a ceiling of concurrency is at least 1; got {ceiling}")
