"""Draining a backlog to the fake TimeBack on loopback: events/s and peak memory (issue 6).

    .venv/bin/python bench/delivery.py [--events 1000000] [--batch 100] [--concurrency 4]
                                       [--platform learnwith|learnwith-ai|beyond-ai]

Writes the backlog straight into a new outbox file (the sidecar's own schema), starts the fake
TimeBack (`mock-upstream --ids-only`) and `caliper-sidecar run` on that outbox, and times the
drain until the fake has every event; with `--platform beyond-ai`, to the fake's Beyond AI
endpoint with `jobs_url`, also until every platform job is confirmed. Reports events/s,
envelopes/s, and the sidecar's peak resident memory (VmHWM), which shows whether the backlog
stayed on disk.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

from common import fake_and_sidecar, get_json, machine, metric

from caliper_sidecar.outbox.sqlite.schema import migrate
from caliper_sidecar.tools.samples import sample_events


def fill(path: Path, events: int) -> int:
    """A backlog of TimeBack sample events with fresh ids; returns the bytes of JSON."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    migrate(conn)
    templates = sample_events()
    total = 0
    now = time.time() - 60
    conn.execute("BEGIN")
    for start in range(0, events, 10_000):
        rows = []
        for i in range(start, min(start + 10_000, events)):
            event = dict(templates[i % len(templates)], id=f"urn:uuid:{uuid.uuid4()}")
            body = json.dumps(event, separators=(",", ":")).encode()
            total += len(body)
            rows.append((event["id"], body, len(body), now))
        conn.executemany(
            "INSERT INTO events (id, body, size, received_at) VALUES (?, ?, ?, ?)", rows
        )
    conn.execute("COMMIT")
    conn.close()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--platform",
        choices=("learnwith", "learnwith-ai", "beyond-ai"),
        default="learnwith",
        help="learnwith: the fake's older events endpoint (events leave as stored); "
        "learnwith-ai: its LearnWith.AI endpoint, every event in the SDK's LearnWith.AI form; "
        "beyond-ai: Beyond AI's with its jobs followed until every event is confirmed",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        outbox = tmp / "outbox.db"
        started = time.perf_counter()
        json_bytes = fill(outbox, args.events)
        print(
            f"backlog of {args.events} events ({json_bytes / 1e6:.0f} MB of JSON, "
            f"{outbox.stat().st_size / 1e6:.0f} MB file) written in "
            f"{time.perf_counter() - started:.0f} s"
        )
        fake, server = fake_and_sidecar(
            tmp,
            args.platform,
            outbox={"path": str(outbox), "max_events": args.events + 1},
            upstream={
                "batch_max_events": args.batch,
                "concurrency": args.concurrency,
                "linger_ms": 0,
            },
        )
        try:
            started = time.perf_counter()
            last = 0
            while True:
                summary = get_json(f"{fake.url}/_mock/events?ids=false")
                if summary["count"] != last:
                    last = summary["count"]
                if last >= args.events:
                    break
                time.sleep(0.5)
            seconds = time.perf_counter() - started
            if args.platform == "beyond-ai":
                while confirmed(server.url) < summary["envelopes"]:
                    time.sleep(0.2)
                confirmed_s = time.perf_counter() - started
            peak = server.peak_rss_mb()
        finally:
            server.stop()
            fake.stop()
    print(f"machine: {machine()}")
    print(
        f"drained {args.events} events in {seconds:.1f} s: {args.events / seconds:,.0f} "
        f"events/s, {summary['envelopes'] / seconds:,.0f} envelopes/s "
        f"(batch {args.batch}, concurrency {args.concurrency})"
    )
    print(f"duplicates at the platform: {summary['duplicates']}; statuses: {summary['statuses']}")
    if args.platform == "beyond-ai":
        print(
            f"every platform job confirmed after {confirmed_s:.1f} s: "
            f"{args.events / confirmed_s:,.0f} events/s confirmed"
        )
    print(f"sidecar peak RSS: {peak:.0f} MB (target: at most 150 MB)")


def confirmed(url: str) -> float:
    """Platform jobs the sidecar has seen completed (its metric)."""
    try:
        return metric(url, 'caliper_sidecar_platform_jobs_total{outcome="completed"}')
    except KeyError:
        return 0.0


if __name__ == "__main__":
    main()
