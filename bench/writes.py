"""Bytes written to the device per event over its whole life in the outbox (issue 33).

    .venv/bin/python bench/writes.py [--events 20000] [--senders 8] [--batch 1 --batch 100]
        [--event-bytes 1100] [--page-size 4096 --page-size 1024] [--rate 5 [--offline]]
        [--checkout OTHER]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

`caliper-sidecar run` (`synchronous = "full"`, `dedupe_window_s = 2`) takes ~1.1 KB events
from `--senders` concurrent senders (single-event requests with `--batch 1`, 100-event arrays
with `--batch 100`) and forwards them to bench/servers.py's sink. Its `write_bytes` in
/proc/PID/io (what the process caused to be written to the device: WAL frames, checkpoints,
everything) is read between phases:

  - ingest: the sink is stopped (SIGSTOP), so nothing is acknowledged while events come in;
  - delivery: the sink resumes, until the outbox has nothing waiting;
  - pruning: once the dedupe window and the pruning cadence (a minute) have passed, single
    events one at a time, whose acknowledgements prune the delivered rows (pruning rides on
    acknowledgements), until the table is empty but for them.

With `--rate N`, one sender sends single events at N a second instead, as the apps of a
classroom do (each event then mostly has a commit of its own); each phase ends with the
checkpoint that follows it, up to CHECKPOINT_AT_LEAST_EVERY_S later. With `--offline`, the
platform is not stopped but gone during ingest (connections refused, as for a classroom
without its network: every retry is recorded), and back for delivery. `--checkout` runs
another checkout's sidecar (common.checkout_command), this script unchanged.

It prints bytes per event for each phase and the whole life, and the ratio to the event's
size (issue 33's budget: at most 3). With `--postgres`, the same run on a fresh database of
that server, for information: the server's WAL bytes (pg_stat_wal) and the bytes its
backends, checkpointer and background writer wrote (pg_stat_io; pg_stat_bgwriter's buffers
before PostgreSQL 16, which has no pg_stat_io), per event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import forward
from common import PYTHON, Process, checkout_command, free_port, machine, metric
from forward import EVENT_BYTES, events, post_batches

from caliper_sidecar.outbox.records import PRUNE_EVERY_S
from caliper_sidecar.outbox.sqlite.storage import CHECKPOINT_AT_LEAST_EVERY_S

DEDUPE_WINDOW_S = 2


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes")


def status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/v1/status") as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def wait_for(what: str, check: Any, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def pg_counters(url: str) -> dict[str, int]:
    import asyncpg  # the postgres extra; only this mode needs it

    async def read() -> dict[str, int]:
        conn = await asyncpg.connect(url)
        try:
            wal = await conn.fetchval("SELECT wal_bytes FROM pg_stat_wal")
            if await conn.fetchval("SELECT to_regclass('pg_stat_io') IS NOT NULL"):
                io = await conn.fetchval(
                    "SELECT coalesce(sum(writes * op_bytes), 0) FROM pg_stat_io "
                    "WHERE object = 'relation'"
                )
            else:  # PostgreSQL 15 and older: the same writes, counted by pg_stat_bgwriter
                io = await conn.fetchval(
                    "SELECT (buffers_checkpoint + buffers_clean + buffers_backend) "
                    "* current_setting('block_size')::bigint FROM pg_stat_bgwriter"
                )
            return {"wal": int(wal), "io": int(io)}
        finally:
            await conn.close()

    return asyncio.run(read())


async def _pg(server: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def run(
    tmp: Path,
    lines: list[bytes],
    senders: int,
    batch: int,
    pg: str | None = None,
    page_size: int | None = None,
    rate: float | None = None,
    offline: bool = False,
    checkout: Path | None = None,
) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(dir=tmp))
    sink_port = free_port()
    sink_args = [
        PYTHON,
        str(Path(__file__).parent / "servers.py"),
        "sink",
        "--port",
        str(sink_port),
    ]
    sink = Process(sink_args, sink_port)
    port = free_port()
    db = work / "outbox.db"
    if page_size and not pg:
        # A file made first keeps its page size: an outbox an earlier release created.
        with sqlite3.connect(db, isolation_level=None) as conn:
            conn.execute(f"PRAGMA page_size = {page_size}")
            conn.execute("PRAGMA journal_mode = WAL")
    outbox = f'url = "{pg}"' if pg else f'path = "{db}"\nsynchronous = "full"'
    config = work / "sidecar.toml"
    config.write_text(
        f"[receiver]\nport = {port}\nmax_events_per_request = 1000\n"
        f"[outbox]\n{outbox}\ndedupe_window_s = {DEDUPE_WINDOW_S}\n"
        f'[upstream]\nendpoint = "{sink.url}/events"\nbearer_token = "bench"\n'
        "batch_max_events = 100\ntimeout_s = 600\n"
        '[log]\nlevel = "warning"\n'
    )
    sidecar = Process(
        [PYTHON, *checkout_command(checkout), "run", "-c", str(config)],
        port,
        log=work / "sidecar.log",
    )
    pid = sidecar.proc.pid
    read = (lambda: sum(pg_counters(pg).values())) if pg else (lambda: write_bytes(pid))
    marks: dict[str, int] = {}
    try:
        time.sleep(1)  # startup's own writes (schema, first checkpoint) are not the events'
        marks["start"] = read()
        commits = metric(sidecar.url, "caliper_sidecar_outbox_commits_total")
        if offline:
            sink.stop()
        else:
            sink.proc.send_signal(signal.SIGSTOP)
        if rate:
            asyncio.run(post_paced(sidecar.url, lines, rate))
        else:
            asyncio.run(post_batches(sidecar.url, lines, senders, batch))
        # The background checkpoint that follows copies the last commits into the file:
        # ingest's writes (a busy outbox's within a second, a quiet one's later).
        settle = CHECKPOINT_AT_LEAST_EVERY_S + 1.5 if rate else 1.5
        time.sleep(settle)
        marks["ingest"] = read()
        commits = metric(sidecar.url, "caliper_sidecar_outbox_commits_total") - commits
        if offline:
            sink = Process(sink_args, sink_port)
        sink.proc.send_signal(signal.SIGCONT)
        first_ack = time.monotonic()  # about when the first pruning ran (there was nothing)
        wait_for("delivery", lambda: status(sidecar.url)["outbox"]["events"] == 0)
        time.sleep(settle)  # the background checkpoint that follows (it is part of delivery)
        marks["delivery"] = read()
        # Pruning runs with an acknowledgement, at most every PRUNE_EVERY_S unless a chunk
        # was full: once that time is up, single events are sent one by one until their
        # acknowledgements have pruned the delivered rows (their own writes are a few
        # events' worth).
        time.sleep(max(DEDUPE_WINDOW_S, PRUNE_EVERY_S - (time.monotonic() - first_ack)) + 1)
        trickle = events(100)
        for i, line in enumerate(trickle):
            asyncio.run(post_batches(sidecar.url, [line], 1, 1))
            time.sleep(0.3)
            if (i == 5) if pg else rows(db) <= i + 2:
                break
        time.sleep(settle)
        marks["pruning"] = read()
        if pg is None and rows(db) > len(trickle):
            raise RuntimeError(f"{rows(db)} rows left after pruning")
    finally:
        sidecar.stop()
        sink.proc.send_signal(signal.SIGCONT)
        sink.stop()
    n = len(lines)
    size = sum(len(line) for line in lines) / n
    out = {"event_bytes": size, "per_commit": n / commits}
    previous = marks["start"]
    for phase in ("ingest", "delivery", "pruning"):
        out[phase] = (marks[phase] - previous) / n
        previous = marks[phase]
    out["life"] = (marks["pruning"] - marks["start"]) / n
    out["ratio"] = out["life"] / size
    return out


async def post_paced(url: str, lines: list[bytes], rate: float) -> None:
    """POST each line alone at `rate` a second, one sender."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        for i, line in enumerate(lines):
            async with session.post(
                f"{url}/v1/events", data=line, headers={"Content-Type": "application/json"}
            ) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"{resp.status}: {await resp.text()}")
            await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument(
        "--page-size",
        type=int,
        action="append",
        help="SQLite outboxes made with this page size first (4096: an earlier release's); "
        "repeat to compare in one run (default: a new outbox's own)",
    )
    parser.add_argument("--event-bytes", type=int, default=EVENT_BYTES)
    parser.add_argument("--postgres", help="also measure a PostgreSQL outbox on this server")
    parser.add_argument(
        "--rate", type=float, help="single events at this many a second, one sender (a classroom)"
    )
    parser.add_argument("--offline", action="store_true", help="the platform gone during ingest")
    parser.add_argument("--checkout", type=Path, help="another checkout's sidecar")
    args = parser.parse_args()
    forward.EVENT_BYTES = args.event_bytes  # what `events` pads to
    pace = f"one sender, {args.rate:g} a second" if args.rate else f"{args.senders} senders"
    print(f"# {machine()}; {args.events} events of ~{args.event_bytes} bytes, {pace}")
    print("backend        batch  events/commit  ingest  delivery  pruning  life(B/event)  ratio")
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch or [1, 100]:
            lines = events(args.events)
            backends: list[tuple[str, str | None, int | None]] = [
                (f"sqlite{f' {p}' if p else ''}", None, p) for p in args.page_size or [None]
            ]
            if args.postgres:
                backends.append(("postgres", args.postgres, None))
            for name, server, page_size in backends:
                pg = None
                if server:
                    # A fresh database, so that nothing else's pruning or vacuum is counted.
                    asyncio.run(_pg(server, "CREATE DATABASE bench_writes"))
                    pg = server.rsplit("/", 1)[0] + "/bench_writes"
                try:
                    r = run(
                        Path(tmp),
                        lines,
                        args.senders,
                        batch,
                        pg,
                        page_size,
                        args.rate,
                        args.offline,
                        args.checkout,
                    )
                finally:
                    if server:
                        asyncio.run(_pg(server, "DROP DATABASE bench_writes WITH (FORCE)"))
                print(
                    f"{name:14} {batch:5} {r['per_commit']:14.1f} {r['ingest']:7.0f} "
                    f"{r['delivery']:9.0f} {r['pruning']:8.0f} {r['life']:14.0f} {r['ratio']:6.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
