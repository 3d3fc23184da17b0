"""What the outbox's page size costs in ingest speed (issue 33), interleaved in one run.

    .venv/bin/python bench/pages.py [--rounds 3] [--seconds 6]

bench/writes.py measures what 1 KB pages save in bytes written; this measures what they cost
in speed: SQLite alone (executemany of 100 rows a commit, `synchronous = FULL`, only the SQLite
calls timed) and the sidecar under wrk (single events and batches of 100; its upstream
unreachable, so ingest alone), each on an outbox file made first with 4 KB pages (as an
earlier release made it) and with 1 KB (this release's). Medians of the rounds.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

from common import free_port, machine, median, sidecar, wrk
from ingest import template

from caliper_sidecar.outbox.sqlite.schema import migrate

PAGES = (4096, 1024)


def made_with(path: Path, page_size: int) -> Path:
    """A new outbox file with this page size (an existing file keeps its own)."""
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute(f"PRAGMA page_size = {page_size}")
        conn.execute("PRAGMA journal_mode = WAL")
    return path


def raw(path: Path, body: bytes, seconds: float) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn)
    conn.execute("PRAGMA synchronous = FULL")
    insert = "INSERT INTO events (id, body, size, received_at) VALUES (?, ?, ?, ?)"
    rows = busy = 0.0
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        batch = [(f"urn:uuid:{uuid.uuid4()}", body, len(body), 0.0) for _ in range(100)]
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert, batch)
        conn.execute("COMMIT")
        busy += time.perf_counter() - started
        rows += len(batch)
    conn.close()
    return rows / busy


def served(tmp: Path, page_size: int, event: Path, batch: int, seconds: int) -> float:
    port = free_port()
    db = made_with(tmp / f"outbox-{port}.db", page_size)
    server = sidecar(
        tmp,
        port,
        outbox={"path": str(db), "synchronous": "full"},
        upstream={"endpoint": "http://127.0.0.1:9/events/1.0/", "bearer_token": "x"},
    )
    try:
        wrk(f"{server.url}/v1/events", event, batch=batch, seconds=2)  # warm-up
        return wrk(f"{server.url}/v1/events", event, batch=batch, seconds=seconds)["rps"] * batch
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        event = template(tmp)
        body = event.read_bytes()
        for n in range(args.rounds):
            for page in PAGES:
                path = made_with(tmp / f"raw-{page}-{n}.db", page)
                results.setdefault(("sqlite executemany, events/s", page), []).append(
                    raw(path, body, args.seconds)
                )
                for batch, what in ((1, "sidecar single, req/s"), (100, "sidecar x100, events/s")):
                    results.setdefault((what, page), []).append(
                        served(tmp, page, event, batch, args.seconds)
                    )
    print(f"machine: {machine()}; {len(body)}-byte events, {args.rounds} rounds, medians")
    print(f"{'':32} {'4 KB pages':>11} {'1 KB pages':>11}  ratio")
    for what in dict.fromkeys(w for w, _ in results):
        old, new = (median(results[(what, page)]) for page in PAGES)
        print(f"{what:32} {old:11.0f} {new:11.0f}  {new / old:.2f}")


if __name__ == "__main__":
    main()
