"""The dispatcher: claims batches from one destination's queue in the outbox, sends them, and
turns each outcome into an outbox operation: acknowledge, retry later, split, or dead-letter.
It is built per destination, with its own batching, concurrency, circuit, state and metrics,
so that one that is down or slow never holds back another: [upstream] over the Outbox itself,
each of [[destinations]] over its own queue (`Outbox.queue(name)`), wired in app.py.

How a refused batch is searched for the events the platform refuses, and how a refusal that
every event gets is told from the events' own, is in `refusals` (pure, tested alone); here is
what each verdict does to the outbox, the circuit and the state.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

import structlog

from caliper_sidecar.config import RetrySettings
from caliper_sidecar.delivery.backoff import Circuit, CircuitState
from caliper_sidecar.delivery.concurrency import AdaptiveConcurrency
from caliper_sidecar.delivery.refusals import Refusals, SplitSearch
from caliper_sidecar.delivery.upstream import Sender, Sent
from caliper_sidecar.exceptions import (
    ArchiveUnavailable,
    AuthFailed,
    EndpointFailed,
    OutboxUnavailable,
    Refused,
    RetryLater,
    UnexpectedAnswer,
)
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.outbox import Batch, Claim, OutboxStats, StoredEvent
from caliper_sidecar.states import DeadLetterReason, UpstreamState

LOGGER: Final = "sidecar.dispatcher"
#: the module's logger; a dispatcher logs through its own, which names its destination
log = structlog.get_logger(LOGGER)

IDLE_POLL_S: Final = 1.0  # also how soon a replay made by another process is noticed
CLAIM_RETRY_S: Final = 1.0


class Batching(Protocol):
    """The keys a destination batches and sends by: [upstream]'s (UpstreamSettings) or one of
    [[destinations]] (DestinationSettings)."""

    @property
    def batch_max_events(self) -> int: ...

    @property
    def batch_max_bytes(self) -> int: ...

    @property
    def linger_ms(self) -> int: ...

    @property
    def concurrency(self) -> int: ...


class DeliveryQueue(Protocol):
    """What the dispatcher does with its destination's queue: the Outbox (for [upstream]), or
    a destination's own place in it."""

    async def claim_batch(self, max_events: int, max_bytes: int, linger_s: float = 0) -> Batch: ...

    async def extend(self, claim: Claim) -> None: ...

    async def release(self, claim: Claim, seqs: Sequence[int]) -> None: ...

    async def acknowledge(
        self,
        claim: Claim,
        seqs: Sequence[int],
        platform_job: str | None = None,
        unconfirmed: str | None = None,
    ) -> None: ...

    async def record_failure(self, claim: Claim, seqs: Sequence[int], error: str) -> None: ...

    async def dead_letter(
        self, claim: Claim, seqs: Sequence[int], reason: str, status: int | None, response: str
    ) -> None: ...

    async def wait_appended(self, timeout: float | None) -> None: ...

    async def stats(self) -> OutboxStats: ...


class Dispatcher:
    """Keeps envelopes in flight to its destination, no event in two at once: as many as its
    adaptive limit allows (delivery/concurrency.py), never more than its `concurrency`.

    Receive order is kept as far as concurrency and retries allow: batches are claimed oldest
    first, and a failed batch goes back to the head of the queue.

    `name` is the destination's (`upstream` for [upstream]): its log lines and its metrics
    carry it. `on_platform_job` follows the platform's jobs ([upstream] with `jobs_url` only).
    """

    def __init__(
        self,
        outbox: DeliveryQueue,
        upstream: Sender,
        *,
        name: str,
        batching: Batching,
        retry: RetrySettings,
        metrics: Metrics,
        on_platform_job: Callable[[str], None] | None = None,
    ) -> None:
        #: the destination's name, as its logs, metrics and status show it
        self.name = name
        self._log = structlog.get_logger(LOGGER, destination=name)
        self._outbox = outbox
        self._on_platform_job = on_platform_job
        self._upstream = upstream
        self._batch = batching
        self._retry = retry
        self._metrics = metrics.for_destination(name)
        self._circuit = Circuit(retry.initial_backoff_s, retry.max_backoff_s)
        #: how many envelopes may be in flight now, under `concurrency`
        self.concurrency = AdaptiveConcurrency(batching.concurrency, time.monotonic())
        self._metrics.concurrency_limit.set(self.concurrency.limit)
        # Slots: one taken by the claim loop before it claims, handed to the send it starts,
        # given back when that send ends. Taken while fewer than the limit are.
        self._slots_taken = 0
        self._slot_freed = asyncio.Event()
        #: requests out now (a split batch sends its parts one after another)
        self._requests_out = 0
        self._sends: set[asyncio.Task[None]] = set()
        self._bookkeeping: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._batch_ids = itertools.count(1)
        self.state = UpstreamState.OK
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.in_flight = 0
        #: sends cut short by the last stop (they go out again after a restart)
        self.sends_cut = 0
        self._refusals = Refusals(retry.refusing_grace_s)
        #: an episode of 2xx answers without a jobId although jobs are followed
        self._unconfirmed_episode = False
        #: set when a send finishes or a claim finds nothing: `drained` looks again then
        self._settled = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.create_task(self._claim_loop(), name="dispatcher")

    async def stop(self, grace_s: float) -> int:
        """Stop claiming, give sends in flight `grace_s` to finish; returns how many were cut.

        Cut sends keep their events in the outbox: they go out again after the restart.
        """
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        cut = 0
        if self._sends:
            _, pending = await asyncio.wait(self._sends, timeout=grace_s)
            cut = len(pending)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.sends_cut = cut
        # Outcomes already decided (a 2xx received) are written before the outbox closes.
        await asyncio.gather(*self._bookkeeping, return_exceptions=True)
        return cut

    @property
    def sender(self) -> Sender:
        return self._upstream

    @property
    def batching(self) -> Batching:
        return self._batch

    def retune(self, batching: Batching, retry: RetrySettings) -> None:
        """New batching, concurrency and retry settings (SIGHUP): the next claims and sends
        use them; sends in flight finish as they are. A lower `concurrency` lowers the limit
        at once, and takes effect as sends in flight end; a higher one lets the limit rise to
        it as the destination allows; a wait longer than a lowered `max_backoff_s` is cut to
        it."""
        self._batch, self._retry = batching, retry
        self._circuit.retune(retry.initial_backoff_s, retry.max_backoff_s)
        self._refusals.grace_s = retry.refusing_grace_s
        self.concurrency.retune(batching.concurrency)
        self._metrics.concurrency_limit.set(self.concurrency.limit)

    def credentials_changed(self) -> None:
        """New secrets (SIGHUP): when they were refused, find out now whether the new ones
        work rather than after the capped backoff."""
        if self.state == UpstreamState.AUTH_FAILED:
            self._circuit.try_now()

    @property
    def retry_in_s(self) -> float:
        """Seconds until the next attempt while backing off; 0 when sending."""
        return round(self._circuit.retry_in(), 3)

    async def drained(self, timeout: float) -> None:
        """Return once nothing waits in the outbox and nothing is in flight, as arq's burst
        mode waits for an empty queue; TimeoutError after `timeout`. Woken by what changes it
        (a send finishing, a claim finding nothing), not by a clock: for tests and tools that
        must know that everything was sent (or dead-lettered)."""
        async with asyncio.timeout(timeout):
            while True:
                self._settled.clear()
                if not self._sends and (await self._outbox.stats()).events == 0:
                    return
                await self._settled.wait()

    # -- claiming --------------------------------------------------------------------------

    async def _take_slot(self) -> None:
        while self._slots_taken >= self.concurrency.limit:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        self._slots_taken += 1

    def _free_slot(self) -> None:
        self._slots_taken -= 1
        self._slot_freed.set()

    async def _claim_loop(self) -> None:
        while True:
            await self._take_slot()
            probe = False
            try:
                probe = await self._circuit.admit()
                batch = await self._next_batch()
            except Exception:
                # A storage error while reading the next batch must not end delivery for the
                # life of the process: say so, wait, and try again.
                self._log.exception("claim_failed", retry_in_s=CLAIM_RETRY_S)
                self._free_slot()
                if probe:
                    self._circuit.probe_abandoned()
                await asyncio.sleep(CLAIM_RETRY_S)
                continue
            except BaseException:
                self._free_slot()
                raise
            if not probe and self._circuit.state != CircuitState.CLOSED:
                # The circuit opened while this batch was being gathered: it waits its turn.
                await self._outbox.release(batch.claim, batch.seqs)
                self._free_slot()
                continue
            task = asyncio.create_task(self._deliver(batch, probe))
            self._sends.add(task)
            task.add_done_callback(self._send_done)

    def _send_done(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        self._free_slot()
        self._settled.set()
        if not task.cancelled() and task.exception() is not None:
            # An outcome that could not be written (a full disk): the outbox released the
            # claims, so the events go out again; at least once, never lost.
            self._log.error("outcome_not_recorded", error=repr(task.exception()))

    async def _next_batch(self) -> Batch:
        """The next batch worth sending: the outbox claims only what is ready (a full batch,
        or an oldest event that has lingered), and says when to ask again."""
        linger_s = self._batch.linger_ms / 1000
        budget = self._batch.batch_max_bytes - self._upstream.overhead
        while True:
            batch = await self._outbox.claim_batch(self._batch.batch_max_events, budget, linger_s)
            if batch.events:
                return batch
            self._settled.set()
            await self._outbox.wait_appended(
                IDLE_POLL_S if batch.ready_in is None else batch.ready_in
            )

    # -- delivering ------------------------------------------------------------------------

    async def _deliver(self, batch: Batch, probe: bool) -> None:
        batch_id = next(self._batch_ids)
        claim, events = batch.claim, batch.events
        self.in_flight += len(events)
        self._metrics.in_flight.inc(len(events))
        search = SplitSearch(events, self._refusals)
        sending: list[StoredEvent] = []  # the part whose outcome is not recorded yet
        try:
            while (part := search.next_part()) is not None:
                sending = part
                if part is not events:
                    await self._outbox.extend(claim)  # a split batch takes several sends
                started = time.monotonic()
                try:
                    sent = await self._send(batch_id, part)
                except Refused as e:
                    sending = []
                    self._refusal_answered(e)
                    verdict = search.refused(part, e, time.monotonic())
                    if verdict is None:
                        self._log.info(
                            "batch_split", batch=batch_id, status=e.status, events=len(part)
                        )
                        continue
                    if verdict.given_up:
                        self._circuit.succeeded()
                    await self._dead_letter_refused(batch_id, claim, verdict.dead, probe)
                    if verdict.refusing is not None:
                        await self._refusing(batch_id, claim, verdict.refusing, e, probe)
                        return
                    continue
                except (RetryLater, AuthFailed) as e:
                    waiting = part + search.unsettled()
                    sending = []
                    await self._failed(batch_id, claim, waiting, e, probe)
                    return
                await self._dead_letter_refused(batch_id, claim, search.accepted(), probe)
                await self._bookkeep(
                    self._outbox.acknowledge(
                        claim, [e.seq for e in part], sent.job_id, sent.unconfirmed
                    ),
                    probe,
                )
                sending = []
                if sent.job_id is not None and self._on_platform_job is not None:
                    self._on_platform_job(sent.job_id)
                self._unconfirmed(sent, len(part))
                self._metrics.events_delivered.inc(len(part))
                self._metrics.tap.publish(
                    "sent", [e.id for e in part], destination=self.name, job=sent.job_id
                )
                self._platform_answered()
                self._log.info(
                    "batch_delivered",
                    batch=batch_id,
                    events=len(part),
                    status=sent.status,
                    platform_job=sent.job_id,
                    duration_ms=round((time.monotonic() - started) * 1000, 1),
                )
            await self._dead_letter_refused(batch_id, claim, search.finished(), probe)
        finally:
            self.in_flight -= len(events)
            self._metrics.in_flight.dec(len(events))
            left = sending + search.unsettled()
            if left:  # cut short by shutdown: the events stay queued, untouched
                await self._outbox.release(claim, [e.seq for e in left])
                if probe:
                    self._circuit.probe_abandoned()

    def _refusal_answered(self, refusal: Refused) -> None:
        """The platform answered with a refusal: it is up, unless it refuses everything."""
        if self.state != UpstreamState.REFUSING or not self._refusals.matches(refusal):
            self._platform_answered()

    async def _refusing(
        self,
        batch_id: int,
        claim: Claim,
        events: list[StoredEvent],
        refusal: Refused,
        probe: bool,
    ) -> None:
        """Stop as `refusing`: the events stay queued, tried again at the capped backoff."""
        reason = f"every event refused alike: {refusal}"
        delay = self._circuit.failed(self._retry.max_backoff_s, probe=probe)
        self._set_state(UpstreamState.REFUSING, reason)
        self._log.warning(
            "batch_refused_alike",
            batch=batch_id,
            events=len(events),
            status=refusal.status,
            response=refusal.body[:200],
            retry_in_s=round(delay, 3),
        )
        await self._bookkeep(
            self._outbox.record_failure(claim, [e.seq for e in events], reason), False
        )

    async def _dead_letter_refused(
        self,
        batch_id: int,
        claim: Claim,
        refused: list[tuple[StoredEvent, Refused]],
        probe: bool,
    ) -> None:
        """Dead-letter single events the platform refused, each with its refusal."""
        for event, e in refused:
            await self._bookkeep(
                self._outbox.dead_letter(
                    claim, [event.seq], DeadLetterReason.REFUSED, e.status, e.body
                ),
                probe,
            )
            self._metrics.events_dead_lettered.labels(reason=DeadLetterReason.REFUSED).inc()
            self._metrics.tap.publish(
                "dead_lettered",
                [event.id],
                destination=self.name,
                reason=DeadLetterReason.REFUSED,
                status=e.status,
            )
            self._log.warning(
                "event_dead_lettered",
                batch=batch_id,
                event_id=event.id,
                reason=DeadLetterReason.REFUSED,
                status=e.status,
                response=e.body[:200],
            )
        if refused and self.state == UpstreamState.REFUSING:
            self._log.error(
                "refusal_dead_lettered",
                grace_s=self._retry.refusing_grace_s,
                events=len(refused),
                status=refused[0][1].status,
            )

    def _unconfirmed(self, sent: Sent, events: int) -> None:
        """Count events accepted without a job to confirm them; warn once per episode."""
        if sent.unconfirmed is None:
            if sent.job_id is not None:
                self._unconfirmed_episode = False
            return
        self._metrics.events_unconfirmed.inc(events)
        if not self._unconfirmed_episode:
            self._unconfirmed_episode = True
            self._log.warning("platform_answered_without_job", reason=sent.unconfirmed)

    async def _send(self, batch_id: int, part: list[StoredEvent]) -> Sent:
        """Send one envelope; any failure that is not the platform's answer counts as
        transient, so that a bug or an odd error backs off instead of resending at once.

        What it met, and its round trip when the destination took it, go to the adaptive
        concurrency; a send cut short by shutdown says nothing and is not counted."""
        self._requests_out += 1
        generation = self.concurrency.started(self._requests_out)
        started = time.monotonic()
        rtt_s: float | None = None
        outcome: bool | None = None  # back-pressure or not, once the send ended
        try:
            sent = await self._upstream.send(
                [e.body for e in part], part[0].sensor, [e.received_at for e in part]
            )
            rtt_s, outcome = time.monotonic() - started, False
            return sent
        except Refused:
            outcome = False  # a verdict on these events, not on the load
            raise
        except (RetryLater, AuthFailed) as e:
            outcome = back_pressure(e)
            raise
        except Exception as e:
            outcome = False  # an error of ours says nothing of the destination's load
            self._log.exception("send_failed_unexpectedly", batch=batch_id)
            raise RetryLater(f"unexpected error while sending: {e!r}") from e
        finally:
            self._requests_out -= 1
            if outcome is not None:
                self._adapt(generation, rtt_s, outcome)

    def _adapt(self, generation: int, rtt_s: float | None, back_pressure: bool) -> None:
        """Tell the adaptive concurrency what a send met; follow its limit."""
        limits = self.concurrency
        change = limits.answered(time.monotonic(), generation, rtt_s, back_pressure=back_pressure)
        if not change:
            return
        self._metrics.concurrency_limit.set(limits.limit)
        if change > 0:
            self._slot_freed.set()  # the claim loop may be waiting for the slot it adds
        # At debug: it may change every round trip; its value is in the status and metrics.
        self._log.debug(
            "concurrency_changed",
            limit=limits.limit,
            ceiling=limits.ceiling,
            back_pressure=back_pressure,
            rtt_ms=None if limits.past_rtt_s is None else round(limits.past_rtt_s * 1000, 1),
            unloaded_rtt_ms=(
                None if limits.base_rtt_s is None else round(limits.base_rtt_s * 1000, 1)
            ),
        )

    async def _failed(
        self,
        batch_id: int,
        claim: Claim,
        events: list[StoredEvent],
        error: RetryLater | AuthFailed,
        probe: bool,
    ) -> None:
        reason = str(error)
        retry_after = error.retry_after_s if isinstance(error, RetryLater) else None
        delay = self._circuit.failed(retry_after, probe=probe)
        if isinstance(error, AuthFailed):
            state = UpstreamState.AUTH_FAILED
        elif isinstance(error, EndpointFailed):
            state = UpstreamState.ENDPOINT_FAILED
        elif isinstance(error, UnexpectedAnswer):
            state = UpstreamState.UNEXPECTED_ANSWER
        else:
            state = UpstreamState.BACKING_OFF
        self._set_state(state, reason)
        self._metrics.tap.publish(
            "failed",
            [e.id for e in events],
            destination=self.name,
            state=state,
            retry_in_s=round(delay, 3),
        )
        # Each attempt at debug: the change of state above is the one line an operator reads
        # (an outage of hours is two lines at info level and above, not one per retry).
        self._log.debug(
            "batch_failed",
            batch=batch_id,
            events=len(events),
            error=reason,
            retry_in_s=round(delay, 3),
        )
        expired: dict[str, list[StoredEvent]] = {}
        keep: list[StoredEvent] = []
        # Authentication, the endpoint and whatever answers in its place are the operator's
        # to fix: they never cost an event its place.
        operators = isinstance(error, AuthFailed | EndpointFailed | UnexpectedAnswer)
        for event in events:
            why = None if operators else self._expiry(event)
            if why is None:
                keep.append(event)
            else:
                expired.setdefault(why, []).append(event)
        for why, dead in expired.items():
            # probe=False: this failure already opened the circuit (above); a write failure
            # here must not count the probe twice.
            await self._bookkeep(
                self._outbox.dead_letter(claim, [e.seq for e in dead], why, None, reason), False
            )
            self._metrics.events_dead_lettered.labels(reason=why).inc(len(dead))
            self._metrics.tap.publish(
                "dead_lettered", [e.id for e in dead], destination=self.name, reason=why
            )
            self._log.warning("events_dead_lettered", reason=why, events=len(dead), error=reason)
        if keep:
            await self._bookkeep(
                self._outbox.record_failure(claim, [e.seq for e in keep], reason), False
            )

    def _expiry(self, event: StoredEvent) -> str | None:
        if self._retry.max_attempts and event.attempts + 1 >= self._retry.max_attempts:
            return DeadLetterReason.MAX_ATTEMPTS
        # Its age as the outbox observed it, never this wall clock (NTP may step it by days).
        if self._retry.max_age_s and event.age_s >= self._retry.max_age_s:
            return DeadLetterReason.MAX_AGE
        return None

    def _platform_answered(self) -> None:
        self._circuit.succeeded()
        self._set_state(UpstreamState.OK, None)

    def _set_state(self, state: UpstreamState, error: str | None) -> None:
        if error is not None:
            self.last_error, self.last_error_at = error, time.time()
        if state == self.state:
            return
        previous, self.state = self.state, state
        # One line per change of state, not per attempt: an outage of hours is two lines.
        if state == UpstreamState.AUTH_FAILED:
            self._log.error("upstream_auth_failed", previous=previous.value, error=error)
        elif state == UpstreamState.ENDPOINT_FAILED:
            self._log.error("upstream_endpoint_failed", previous=previous.value, error=error)
        elif state == UpstreamState.REFUSING:
            self._log.error("upstream_refusing", previous=previous.value, error=error)
        elif state == UpstreamState.UNEXPECTED_ANSWER:
            self._log.error("upstream_unexpected_answer", previous=previous.value, error=error)
        elif state == UpstreamState.BACKING_OFF:
            self._log.warning("upstream_backing_off", previous=previous.value, error=error)
        else:
            self._log.info("upstream_recovered", previous=previous.value)

    async def _bookkeep(self, operation: Awaitable[None], probe: bool) -> None:
        """Run an outbox write that must finish even if this send is cancelled.

        If it cannot be written (a full disk), the outbox releases the events and they will
        be sent again; the circuit opens first, so that happens after a backoff, not at once.
        """
        task = asyncio.ensure_future(operation)
        self._bookkeeping.add(task)
        task.add_done_callback(self._bookkeeping.discard)
        try:
            await asyncio.shield(task)
        except OutboxUnavailable as e:
            self._circuit.failed(probe=probe)
            self._set_state(UpstreamState.BACKING_OFF, f"cannot record outcomes: {e}")
            raise


def back_pressure(outcome: RetryLater | AuthFailed) -> bool:
    """Whether a failed send says the destination has more than it takes now: a 429, a 503
    and the other transient answers (408, 425, 5xx), a timeout, a connection refused or cut.
    Not an endpoint that is not there (404, 405, 410), something else answering in its place,
    an archive's disk, or credentials refused: fewer requests would not help those."""
    not_load = AuthFailed | EndpointFailed | UnexpectedAnswer | ArchiveUnavailable
    return not isinstance(outcome, not_load)
