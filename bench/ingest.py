"""Ingest throughput against this machine's ceilings, side by side in one run (issue 6).

    .venv/bin/python bench/ingest.py [--rounds 3] [--seconds 10] [--connections 64]

Single events: wrk (one thread, 64 keep-alive connections, a new event id per request) against
  - the bare aiohttp handler (parse the JSON, answer 202, store nothing): the HTTP ceiling,
  - caliper-sidecar with synchronous = "full" and "normal" (default config otherwise: strict
    TimeBack validation, an info log line per request),
  - the naive design: one SQLite transaction per request (synchronous = "full").
Batches: 100 events per request against the sidecar ("full"), and the raw sqlite3
executemany + commit rate for the same rows, 100 per transaction, over as long a run: the
storage ceiling.
The sidecar's upstream is unreachable, so its dispatcher is idle (backing off) and the
numbers are ingest alone. Medians of the rounds; servers start fresh for every run.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from common import PYTHON, Process, free_port, machine, median, metric, sidecar_by, wrk

from caliper_sidecar.outbox.sqlite.schema import migrate
from caliper_sidecar.outbox.sqlite.storage import PAGE_SIZE
from caliper_sidecar.tools.samples import sample_events

#: what TimeBack's official SDK (timeback-caliper 0.4.0) posts, recorded by tests/data's script
SDK_DATA = Path(__file__).resolve().parent.parent / "tests/data/timeback-sdk-0.4.0/beyond-ai.json"


def template(tmp: Path, events: str = "reference") -> Path:
    """The event wrk sends (its id replaced per request): the reference's ViewEvent, or the
    SDK's ActivityEvent (TimeBack's own profile, what apps using the SDK send most)."""
    if events == "sdk":
        envelopes = json.loads(SDK_DATA.read_text())
        event = next(e for env in envelopes for e in env["data"] if e["type"] == "ActivityEvent")
    else:
        event = sample_events()[6]
    event["id"] = "__ID__"
    path = tmp / "event.json"
    path.write_text(json.dumps(event, separators=(",", ":")))
    return path


def sidecar_factory(
    synchronous: str, command: Sequence[str] = ("-m", "caliper_sidecar")
) -> Callable[[Path, int], Process]:
    """The sidecar's `run` (what Python runs given `run -c CONFIG`: `command`)."""

    def start(tmp: Path, port: int) -> Process:
        return sidecar_by(
            command,
            tmp,
            port,
            outbox={"path": str(tmp / f"outbox-{port}.db"), "synchronous": synchronous},
            upstream={"endpoint": "http://127.0.0.1:9/events/1.0/", "bearer_token": "x"},
        )

    return start


def bare(tmp: Path, port: int) -> Process:
    return Process([PYTHON, "bench/servers.py", "bare", "--port", str(port)], port)


def naive(tmp: Path, port: int) -> Process:
    return Process(
        [
            PYTHON,
            "bench/servers.py",
            "naive",
            "--port",
            str(port),
            "--db",
            str(tmp / f"naive-{port}.db"),
        ],
        port,
    )


#: seconds of load before each measured run (the storage ceiling runs as long)
WARMUP_S: Final = 2


def measure(
    start: Callable[[Path, int], Process],
    tmp: Path,
    event: Path,
    batch: int,
    seconds: int,
    connections: int,
) -> dict[str, float]:
    port = free_port()
    server = start(tmp, port)
    try:
        wrk(server.url, event, batch=batch, connections=connections, seconds=WARMUP_S)
        try:
            commits_before = metric(server.url, "caliper_sidecar_outbox_commits_total")
        except (KeyError, OSError):
            commits_before = None
        result = wrk(server.url, event, batch=batch, connections=connections, seconds=seconds)
        if commits_before is not None:
            commits = metric(server.url, "caliper_sidecar_outbox_commits_total") - commits_before
            result["requests_per_commit"] = result["rps"] * seconds / max(commits, 1)
        result["peak_rss_mb"] = server.peak_rss_mb()
        return result
    finally:
        server.stop()


def raw_executemany(tmp: Path, body: bytes, warmup_s: float, seconds: float) -> float:
    """Events/s of the bare storage path: executemany 100 rows of this event, commit, repeat,
    with plain sqlite3 (no thread, no event loop) and only the SQLite calls timed.

    It runs as long as a sidecar run does (warm-up, then the measured seconds) and counts the
    measured part only, so that the table has grown as the sidecar's has: the rate falls as
    the table grows (here ~48,000 events/s over the first 30,000 rows, ~26,000 at 300,000),
    and a ceiling taken on a nearly empty table would be one no server reaches.
    """
    path = tmp / "raw.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # the outbox's own layout
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn)
    conn.execute("PRAGMA synchronous = FULL")
    insert = "INSERT INTO events (id, body, size, received_at) VALUES (?, ?, ?, ?)"
    measured_from = time.monotonic() + warmup_s
    ends = measured_from + seconds
    rows = busy = 0.0
    while (now := time.monotonic()) < ends:
        batch = [(f"urn:uuid:{uuid.uuid4()}", body, len(body), 0.0) for _ in range(100)]
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert, batch)
        conn.execute("COMMIT")
        if now >= measured_from:
            busy += time.perf_counter() - started
            rows += len(batch)
    conn.close()
    return rows / busy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--events",
        choices=("reference", "sdk"),
        default="reference",
        help="the event sent: the reference's ViewEvent, or the SDK's ActivityEvent",
    )
    parser.add_argument(
        "--targets-only",
        action="store_true",
        help="only the runs the targets compare (skip synchronous=normal and the naive design)",
    )
    args = parser.parse_args()
    single = {
        "bare aiohttp, no storage (HTTP ceiling)": bare,
        "sidecar, synchronous=full": sidecar_factory("full"),
        "sidecar, synchronous=normal": sidecar_factory("normal"),
        "naive: one transaction per request (full)": naive,
    }
    if args.targets_only:
        del (
            single["sidecar, synchronous=normal"],
            single["naive: one transaction per request (full)"],
        )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in single}
    batch_results: list[dict[str, float]] = []
    raw: list[float] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        event = template(tmp, args.events)
        for round_ in range(args.rounds):
            for name, start in single.items():
                results[name].append(measure(start, tmp, event, 1, args.seconds, args.connections))
            batch_results.append(
                measure(sidecar_factory("full"), tmp, event, 100, args.seconds, args.connections)
            )
            raw_dir = tmp / f"raw-{round_}"
            raw_dir.mkdir()
            raw.append(raw_executemany(raw_dir, event.read_bytes(), WARMUP_S, args.seconds))
    print(
        f"machine: {machine()}; {args.rounds} rounds of {args.seconds} s, "
        f"{args.connections} connections, medians"
    )
    print("\nsingle-event ingest")
    print(f"  {'server':45s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/commit':>10s}")
    ceiling = median([r["rps"] for r in results["bare aiohttp, no storage (HTTP ceiling)"]])
    for name, runs in results.items():
        per_commit = [r["requests_per_commit"] for r in runs if "requests_per_commit" in r]
        print(
            f"  {name:45s} {median([r['rps'] for r in runs]):8.0f} "
            f"{median([r['p50_ms'] for r in runs]):8.2f} "
            f"{median([r['p99_ms'] for r in runs]):8.2f} "
            f"{median(per_commit) if per_commit else float('nan'):10.1f}"
        )
        if any(r["errors"] for r in runs):
            print(f"    errors: {[r['errors'] for r in runs]}")
    full = median([r["rps"] for r in results["sidecar, synchronous=full"]])
    print(f"  sidecar full / HTTP ceiling: {full / ceiling:.2f} (target 0.7)")
    events = median([r["rps"] * 100 for r in batch_results])
    print("\nbatch ingest, 100 events per request")
    print(
        f"  sidecar, synchronous=full        {events:10.0f} events/s, "
        f"p99 {median([r['p99_ms'] for r in batch_results]):.1f} ms"
    )
    print(f"  raw executemany + commit (full)  {median(raw):10.0f} events/s")
    print(f"  sidecar / storage ceiling: {events / median(raw):.2f} (target 0.9)")


if __name__ == "__main__":
    main()
