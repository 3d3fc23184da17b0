"""Processing confirmation: following the platform's jobs until they say what became of events.

Beyond AI answers an envelope with a `jobId` and processes it later; `GET /jobs/{id}/status` then
says `completed` or `failed`. With `upstream.jobs_url` set, every job the platform opened is
followed here: polled a second after the send, then less and less often, until it finishes or
`GIVE_UP_AFTER_S` have passed (a job the jobs route does not know yet is asked about again for
`NOT_FOUND_FOR_S`). A completed job confirms its events; a failed one dead-letters the
events it names (all of those it did not process, when it names none) with the platform's reason,
and queues the others again. A job that never finishes is given up on, its events marked
`unconfirmed`: visible in the status and the metrics, never silently dropped.

The schedule lives in memory on the monotonic clock (a wall-clock step must not stall it); the
jobs themselves are in the outbox, so a restart picks up every job still open. On a shared
PostgreSQL outbox following a job is a lease, like a claim: each replica renews its own every
`ADOPT_EVERY_S` and adopts those nobody follows, so the jobs of a replica that stopped or died
are followed by the others.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import structlog

from caliper_sidecar.config import UPSTREAM
from caliper_sidecar.delivery.upstream import JobStatuses
from caliper_sidecar.exceptions import AuthFailed, OutboxUnavailable, Refused, RetryLater
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.outbox import Outbox, PlatformJobOutcome
from caliper_sidecar.states import DeadLetterReason
from caliper_sidecar.waits import wait_set

log = structlog.get_logger("sidecar.confirmations")

FIRST_POLL_S: Final = 1.0  # TimeBack's SDK polls its jobs every second
MAX_POLL_INTERVAL_S: Final = 30.0
GIVE_UP_AFTER_S: Final = 3600.0
#: how long a job the platform says it does not know is asked about again: a job store may lag
#: behind the endpoint that answered with the job
NOT_FOUND_FOR_S: Final = 600.0
CONCURRENT_POLLS: Final = 4
#: how often open jobs are asked for again: jobs of replicas that stopped are adopted, and
#: the leases of this one's renewed (well within a lease: 2 × upstream.timeout_s + 5 s)
ADOPT_EVERY_S: Final = 10.0


class JobFollower:
    """Polls the platform's jobs and applies what they say to the outbox. Only [upstream]
    follows jobs: what it dead-letters counts as the `upstream` destination's."""

    def __init__(self, outbox: Outbox, upstream: JobStatuses, metrics: Metrics) -> None:
        self._outbox = outbox
        self._upstream = upstream
        self._metrics = metrics
        self._dead_lettered = metrics.for_destination(UPSTREAM).events_dead_lettered
        #: job id -> (when to look next, current interval, when it was first seen), monotonic
        self._due: dict[str, tuple[float, float, float]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._polls = asyncio.Semaphore(CONCURRENT_POLLS)
        self._next_adoption = 0.0

    @property
    def following(self) -> int:
        return len(self._due)

    async def start(self) -> None:
        """Pick up the jobs still open in the outbox (left by an earlier run), then follow."""
        await self._adopt()
        self._task = asyncio.create_task(self._run(), name="job-follower")

    async def _adopt(self) -> None:
        """Follow the open jobs the outbox gives this process: on a shared outbox, those of
        replicas that stopped or died, and its own, whose leases are renewed so."""
        for job in await self._outbox.pending_platform_jobs():
            self.track(job)
        self._next_adoption = time.monotonic() + ADOPT_EVERY_S

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def track(self, job: str) -> None:
        """Follow a job the platform just opened."""
        now = time.monotonic()
        if job not in self._due:
            self._due[job] = (now + FIRST_POLL_S, FIRST_POLL_S, now)
            self._changed.set()

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            if now >= self._next_adoption:
                try:
                    await self._adopt()
                except Exception:  # a database that is away: try at the next round
                    log.exception("job_adoption_failed")
                    self._next_adoption = now + ADOPT_EVERY_S
                continue
            ready = [job for job, (at, _, _) in self._due.items() if at <= now]
            if ready:
                await asyncio.gather(*(self._look(job) for job in ready))
                continue
            wait = min((at for at, _, _ in self._due.values()), default=now + 60)
            wait = min(wait, self._next_adoption) - now
            self._changed.clear()
            await wait_set(self._changed, max(wait, 0.01))

    async def _look(self, job: str) -> None:
        async with self._polls:
            try:
                await self._poll(job)
            except OutboxUnavailable as e:
                # The answer could not be written (a full disk): ask again later.
                log.warning("job_outcome_not_recorded", job=job, error=str(e))
                self._later(job)
            except Exception:
                log.exception("job_poll_failed", job=job)
                self._later(job)

    async def _poll(self, job: str) -> None:
        try:
            answer = await self._upstream.job_status(job)
        except Refused as e:
            _, _, first_seen = self._due[job]
            if e.status == 404 and time.monotonic() - first_seen < NOT_FOUND_FOR_S:
                await self._not_yet(job, "waiting", f"jobs route answered HTTP 404: {e.body[:200]}")
                return
            # The platform does not know this job (expired, or never had it).
            await self._give_up(job, f"the platform does not know the job: HTTP {e.status}")
            return
        except (RetryLater, AuthFailed) as e:
            await self._not_yet(job, "waiting", str(e))
            return
        state = answer.get("state")
        if state == "completed" and _return_status(answer) != "error":
            await self._finish(job, PlatformJobOutcome(failed=False, processed=_processed(answer)))
        elif state in ("completed", "failed"):
            reason = _failed_reason(answer)
            ids = await self._outbox.job_ids_sent_in(job)
            named = frozenset(i for i in ids if i in reason)
            outcome = PlatformJobOutcome(True, reason, _processed(answer), named or None)
            await self._finish(job, outcome)
        else:
            await self._not_yet(job, str(state or "waiting"), None)

    async def _not_yet(self, job: str, state: str, error: str | None) -> None:
        """The job is not finished (or could not be read): look again later, or give up."""
        await self._outbox.platform_job_polled(job, state, error)
        _, interval, first_seen = self._due[job]
        now = time.monotonic()
        if now - first_seen >= GIVE_UP_AFTER_S:
            # Bounded: a job that never finishes is reported, and no longer asked about.
            await self._give_up(job, f"not finished after {GIVE_UP_AFTER_S:.0f} s ({state})")
            return
        interval = min(interval * 2, MAX_POLL_INTERVAL_S)
        self._due[job] = (now + interval, interval, first_seen)

    async def _finish(self, job: str, outcome: PlatformJobOutcome) -> None:
        dead = await self._outbox.finish_platform_job(job, outcome)
        self._due.pop(job, None)
        state = "failed" if outcome.failed else "completed"
        self._metrics.platform_jobs.labels(outcome=state).inc()
        if dead:
            self._dead_lettered.labels(reason=DeadLetterReason.PLATFORM_FAILED).inc(dead)
        if outcome.failed:
            log.warning("platform_job_failed", job=job, dead_lettered=dead, reason=outcome.reason)
        else:
            log.info("platform_job_completed", job=job)
        self._metrics.tap.publish(
            "job_failed" if outcome.failed else "confirmed",
            destination=UPSTREAM,
            job=job,
            dead_lettered=dead or None,
        )

    async def _give_up(self, job: str, reason: str) -> None:
        await self._outbox.give_up_platform_job(job, reason)
        self._due.pop(job, None)
        self._metrics.platform_jobs.labels(outcome="unconfirmed").inc()
        log.error("platform_job_unconfirmed", job=job, reason=reason)
        self._metrics.tap.publish("unconfirmed", destination=UPSTREAM, job=job, reason=reason)

    def _later(self, job: str) -> None:
        """Ask again after the current interval (an error of ours, not the platform's answer)."""
        if job in self._due:
            _, interval, first_seen = self._due[job]
            self._due[job] = (time.monotonic() + interval, interval, first_seen)


def _return_status(job: dict[str, Any]) -> Any:
    value = job.get("returnValue")
    return value.get("status") if isinstance(value, dict) else None


def _processed(job: dict[str, Any]) -> dict[str, str] | None:
    """externalId -> allocatedId, from the job's `returnValue.results`; None when they name no
    event (no results, or results without external ids: then they confirm the whole job)."""
    value = job.get("returnValue")
    results = value.get("results") if isinstance(value, dict) else None
    out: dict[str, str] = {}
    for item in results if isinstance(results, list) else []:
        if isinstance(item, dict) and isinstance(item.get("externalId"), str):
            out[item["externalId"]] = str(item.get("allocatedId", ""))
    return out or None


def _failed_reason(job: dict[str, Any]) -> str:
    reason = job.get("failedReason")
    if isinstance(reason, str) and reason:
        return reason[:1024]
    return f"the platform's job ended {job.get('state')!r} without a reason"
