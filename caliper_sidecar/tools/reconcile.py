"""`caliper-sidecar reconcile [--since T] [--until T] [--dry-run]`: the events delivered
upstream (by `eventTime` in the range) that the outbox still keeps, checked against what the
platform lists now, the missing ones sent again unless `--dry-run` (docs/operators.md).

Exit 0; 1 with `--dry-run` when any is missing; 2 when the platform cannot list (LearnWith.AI
lists nothing; a listing that fails or is refused). Safe while `run` runs: the outbox is opened
beside it, and what is queued again is sent by it (any replica on PostgreSQL).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TextIO

from caliper_sidecar.config import UPSTREAM, Settings
from caliper_sidecar.delivery.reads import PlatformReader, read_session
from caliper_sidecar.delivery.reconcile import ListingUnavailable, Reconciler, event_time
from caliper_sidecar.delivery.reconciling import Totals, check
from caliper_sidecar.delivery.tokens import token_source
from caliper_sidecar.delivery.upstream import default_sensor
from caliper_sidecar.exceptions import AuthFailed
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.outbox import Outbox
from caliper_sidecar.outbox.records import DeliveredUpstream
from caliper_sidecar.preflight import reconcile_unavailable
from caliper_sidecar.presets import events_url

#: delivered events read from the outbox, and checked, at a time
CHUNK = 2000


def in_range(row: DeliveredUpstream, since: float | None, until: float | None) -> bool:
    moment = event_time(row.body)
    if moment is None:
        return False
    t = moment.timestamp()
    return (since is None or t >= since) and (until is None or t < until)


async def reconcile(
    settings: Settings,
    outbox: Outbox,
    since: float | None,
    until: float | None,
    dry_run: bool,
    out: TextIO = sys.stdout,
) -> int:
    """The command's work on an open outbox; returns its exit status."""
    listing = events_url(settings.upstream.endpoint)
    if listing is None:
        print(f"caliper-sidecar: {reconcile_unavailable(settings)}", file=sys.stderr)
        return 2
    metrics = Metrics()
    u = settings.upstream
    async with read_session() as session:
        tokens = token_source(
            session, settings.oauth, u.bearer_token, u.timeout_s, metrics.for_destination(UPSTREAM)
        )
        reader = PlatformReader(session, listing, u.timeout_s, tokens, metrics)
        reconciler = Reconciler(reader.page, settings.reconcile.give_up_s)
        report = Totals()
        after = 0
        try:
            while True:
                rows = await outbox.delivered_upstream(
                    older_than_s=0, unchecked_only=False, limit=CHUNK, after_seq=after
                )
                if not rows:
                    break
                after = rows[-1].seq
                chosen = [r for r in rows if in_range(r, since, until)]
                if chosen:
                    found, resent = await check(
                        outbox,
                        reconciler,
                        chosen,
                        u.sensor or default_sensor(),
                        metrics,
                        resend=not dry_run,
                    )
                    report.add(found, resent)
        except (ListingUnavailable, AuthFailed) as e:
            print(f"caliper-sidecar: the platform cannot list now: {e}", file=sys.stderr)
            return 2
    span = "" if since is None and until is None else f", eventTime {_span(since, until)}"
    print(f"events delivered upstream and kept in the outbox{span}, against {listing}", file=out)
    print(f"checked  {report.checked}", file=out)
    print(f"held     {report.held}", file=out)
    print(f"missing  {report.missing}", file=out)
    print(f"re-sent  {report.resent}" + (" (--dry-run: none)" if dry_run else ""), file=out)
    if report.given_up:
        print(
            f"given up {report.given_up} (missing for longer than reconcile.give_up_s: "
            "not sent again; see their journeys)",
            file=out,
        )
    return 1 if dry_run and report.missing else 0


def _span(since: float | None, until: float | None) -> str:
    first = "" if since is None else f"from {_when(since)}"
    last = "" if until is None else f"before {_when(until)}"
    return " ".join(part for part in (first, last) if part)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
