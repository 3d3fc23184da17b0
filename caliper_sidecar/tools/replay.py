"""`caliper-sidecar replay`: events an `archive` destination kept, queued again for the
named destinations, ids unchanged and bodies as archived (docs/archive.md, "Replay").

The archive's files are by hour of receipt and the selection is by `eventTime`, which an
app's clock sets: an event is received at or after its eventTime, give or take that clock's
error, so the files whose hour ended more than CLOCK_SLACK_S before `--since` are not read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from caliper_sidecar.cli_times import parse_moment
from caliper_sidecar.config import UPSTREAM, DestinationSettings, Settings
from caliper_sidecar.delivery.archive import read_lines, received_since
from caliper_sidecar.exceptions import ConfigError, OutboxUnavailable
from caliper_sidecar.ids import canonical_id
from caliper_sidecar.outbox import Outbox, Replay
from caliper_sidecar.outbox.records import DEAD_CHUNK

#: how far ahead of its receipt an event's eventTime may be (an app's clock running fast)
#: and still be found: the files of the day before `--since` are read too
CLOCK_SLACK_S: Final = 86_400.0
#: events queued again per transaction (as dead letters are replayed: a running sidecar's
#: ingest never waits long behind one)
REPLAY_CHUNK: Final = DEAD_CHUNK


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """What to replay, checked against the configuration: the archive to read, the range of
    eventTime [since, until), the actor (None: everyone's), and the queues to send to."""

    archive: DestinationSettings
    since: float
    until: float | None
    actor: str | None
    queues: tuple[str, ...]


@dataclass(slots=True)
class Tally:
    """What a replay read, queued and skipped."""

    files: int = 0
    read: int = 0
    queued: int = 0
    out_of_range: int = 0
    other_actor: int = 0
    #: the same id met again (an append the archive retried after a crash writes it twice)
    twice: int = 0
    #: not a JSON object with a string id and a readable eventTime
    unreadable: int = 0
    seen: set[str] = field(default_factory=set, repr=False)

    @property
    def skipped(self) -> int:
        return self.out_of_range + self.other_actor + self.twice + self.unreadable


def plan_replay(
    settings: Settings,
    since: str,
    until: str | None,
    actor: str | None,
    to: Sequence[str] | None,
    source: str | None,
    now: float,
) -> ReplayPlan:
    """The replay the command line asks for; ConfigError, saying what is wrong, when it
    cannot be done as asked."""
    archives = [d for d in settings.destinations if d.kind == "archive"]
    names = ", ".join(d.name for d in archives)
    if not archives:
        raise ConfigError(
            "replay reads the files of an archive destination, and this configuration has "
            'none (a [[destinations]] entry with kind = "archive")'
        )
    if source is not None:
        found = [d for d in archives if d.name == source]
        if not found:
            raise ConfigError(f"--from {source}: not an archive destination (archives: {names})")
        archive = found[0]
    elif len(archives) > 1:
        raise ConfigError(f"several archive destinations ({names}): name one with --from NAME")
    else:
        archive = archives[0]
    if not Path(archive.dir).is_dir():
        raise ConfigError(
            f"the archive {archive.name} has no dir {archive.dir} (no `run` has archived there "
            "yet?)"
        )
    start = _moment("--since", since, now)
    end = None if until is None else _moment("--until", until, now)
    if end is not None and end < start:
        raise ConfigError(f"--until {until} is before --since {since}")
    senders = [UPSTREAM, *(d.name for d in settings.destinations if d.kind != "archive")]
    if not to:
        return ReplayPlan(archive, start, end, actor, tuple(senders))
    for name in to:
        if name in {d.name for d in archives}:
            raise ConfigError(
                f"--to {name}: an archive (replay reads archives, never writes them); the "
                f"destinations it sends to: {', '.join(senders)}"
            )
        if name not in senders:
            raise ConfigError(
                f"--to {name}: not a destination of this configuration; the destinations "
                f"replay sends to: {', '.join(senders)}"
            )
    return ReplayPlan(archive, start, end, actor, tuple(dict.fromkeys(to)))


def _moment(option: str, text: str, now: float) -> float:
    try:
        return parse_moment(text, now)
    except ValueError as e:
        raise ConfigError(f"{option}: {e}") from None


async def check_known(outbox: Outbox, queues: Sequence[str]) -> None:
    """ConfigError when a destination to replay to has no place in the outbox yet (no
    `run` has started with it): nothing would send what is queued for it."""
    for name in queues:
        if name == UPSTREAM:
            continue
        try:
            await outbox.destination_stats(name)
        except OutboxUnavailable as e:
            if e.reason != "unknown_destination":
                raise
            raise ConfigError(
                f"--to {name}: no `run` has started with this destination yet, so it has no "
                "place in the outbox; start `run` with it first"
            ) from None


async def replay_archive(
    outbox: Outbox, plan: ReplayPlan, progress: Callable[[int], None] | None = None
) -> Tally:
    """Read the archive's files and queue the events the plan selects again, REPLAY_CHUNK
    per transaction, each committed before the next is read; telling `progress` the running
    count. (The files are read in the loop's thread: the command does nothing else
    meanwhile.)"""
    tally = Tally()
    chunk: list[Replay] = []
    for line in _lines(Path(plan.archive.dir), plan.since - CLOCK_SLACK_S, tally):
        event = _selected(line, plan, tally)
        if event is None:
            continue
        chunk.append(event)
        if len(chunk) >= REPLAY_CHUNK:
            await _queue(outbox, chunk, tally, progress)
    if chunk:
        await _queue(outbox, chunk, tally, progress)
    return tally


async def _queue(
    outbox: Outbox,
    chunk: list[Replay],
    tally: Tally,
    progress: Callable[[int], None] | None,
) -> None:
    await outbox.replay(chunk)
    tally.queued += len(chunk)
    chunk.clear()
    if progress is not None:
        progress(tally.queued)


def _lines(directory: Path, received_from: float, tally: Tally) -> Iterator[bytes]:
    for name in received_since(directory, received_from):
        tally.files += 1
        yield from read_lines(directory / name)


def _selected(line: bytes, plan: ReplayPlan, tally: Tally) -> Replay | None:
    """The event on this line to queue again, or None (counted in the tally as skipped)."""
    tally.read += 1
    try:
        event: Any = json.loads(line)
        id_, when = event["id"], _instant(event["eventTime"])
        if not isinstance(id_, str):
            raise TypeError(id_)
    except (ValueError, TypeError, KeyError):
        tally.unreadable += 1
        return None
    if when < plan.since or (plan.until is not None and when >= plan.until):
        tally.out_of_range += 1
        return None
    if plan.actor is not None and _actor(event) != plan.actor:
        tally.other_actor += 1
        return None
    key = canonical_id(id_)
    if key in tally.seen:
        tally.twice += 1
        return None
    tally.seen.add(key)
    return Replay(key, line, plan.queues)


def _instant(value: Any) -> float:
    """An eventTime as seconds since the epoch (one without a zone taken as UTC)."""
    if not isinstance(value, str):
        raise TypeError(value)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _actor(event: dict[str, Any]) -> Any:
    """The event's actor id: the `actor` string, or `actor.id`."""
    actor = event.get("actor")
    return actor.get("id") if isinstance(actor, dict) else actor


def report(plan: ReplayPlan, tally: Tally) -> list[str]:
    """What `replay` prints: how many were read, queued per destination, and skipped."""
    per_queue = ", ".join(f"{name} {tally.queued}" for name in plan.queues)
    return [
        f"read {tally.read} events from {tally.files} file(s) of the archive "
        f"{plan.archive.name} ({plan.archive.dir})",
        f"queued {tally.queued} events again: {per_queue}",
        f"skipped {tally.skipped}: {tally.out_of_range} with eventTime outside the range, "
        f"{tally.other_actor} of another actor, {tally.twice} archived twice, "
        f"{tally.unreadable} unreadable",
    ]
