"""Drain at the platform's pace (issue 33): a backlog drained to a platform of limited
capacity by each fixed concurrency and by the adaptive one, side by side in one run.

    .venv/bin/python bench/drain.py [--events 200000] [--capacity 4 16] [--latency-ms 100]
                                    [--fixed 1 2 4 8 16 32] [--ceiling 32] [--batch 100]
                                    [--max-run-s 240]

The platform is the fake TimeBack (`mock-upstream --ids-only`) with `capacity` C: it serves C
envelopes at once, each in `--latency-ms`; past C they wait their turn (their latency rises),
and past 2C (a queue of C) it answers 429 with Retry-After: 1. `--capacity 0` is a platform
that takes everything. For each C the backlog is written once into an outbox file (the
sidecar's own schema) and copied for each run; each run starts a fresh fake and
`caliper-sidecar run` with the default retry settings, and times the drain until the fake
holds every event (a run still draining after `--max-run-s` is reported as such). The
adaptive run's limit is read from `/v1/status` every quarter second.

A fixed concurrency is the sidecar as it was before issue 33: this same code with the adaptive
limit replaced by a fixed one (`fixed-sidecar`, below, patches it in), so that nothing else
differs between the runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BENCH, PYTHON, Process, free_port, get_json, machine, sidecar_by
from delivery import fill


@dataclass
class Run:
    label: str
    seconds: float
    delivered: int
    statuses: dict[str, int]
    most_at_once: int
    #: (seconds since the drain started, limit), for the adaptive run
    limits: list[tuple[float, int]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.seconds > 0

    def settled(self) -> list[int]:
        """The limit over the second half of the drain."""
        return [limit for at, limit in self.limits if at >= self.seconds / 2]


def drain(
    outbox: Path, tmp: Path, events: int, capacity: int, args: argparse.Namespace, fixed: int
) -> Run:
    """One drain of a copy of `outbox`: at `fixed` concurrency, or adaptive (fixed 0)."""
    copy = tmp / "outbox.db"
    shutil.copyfile(outbox, copy)
    fake_port = free_port()
    fake = Process(
        [PYTHON, "-m", "caliper_sidecar", "mock-upstream", "--port", str(fake_port), "--ids-only"],
        fake_port,
    )
    server = None
    try:
        faults = {"capacity": capacity, "capacity_queue": capacity, "latency_ms": args.latency_ms}
        post_json(f"{fake.url}/_mock/faults", faults)
        command = (str(BENCH / "drain.py"), "fixed-sidecar") if fixed else ("-m", "caliper_sidecar")
        server = sidecar_by(
            command,
            tmp,
            free_port(),
            outbox={"path": str(copy), "max_events": events + 1},
            upstream={
                "endpoint": f"{fake.url}/events/1.0/",
                "batch_max_events": args.batch,
                "linger_ms": 0,
                "concurrency": fixed or args.ceiling,
            },
            oauth={
                "token_url": f"{fake.url}/auth/1.0/token",
                "client_id": "sidecar",
                "client_secret": "sidecar-secret",
            },
            log={"level": "warning"},
        )
        limits: list[tuple[float, int]] = []
        done = threading.Event()
        started = time.perf_counter()
        sampler = threading.Thread(
            target=sample, args=(server.url, started, limits, done), daemon=True
        )
        sampler.start()
        while True:
            summary = get_json(f"{fake.url}/_mock/events?ids=false")
            if summary["count"] >= events:
                seconds = time.perf_counter() - started
                break
            if time.perf_counter() - started > args.max_run_s:
                seconds = 0.0  # not finished
                break
            time.sleep(0.1)
        done.set()
        sampler.join()
        return Run(
            f"fixed {fixed}" if fixed else f"adaptive (ceiling {args.ceiling})",
            seconds,
            summary["count"],
            summary["statuses"],
            summary["most_at_once"],
            limits,
        )
    finally:
        if server is not None:
            server.stop()
        fake.stop()


def sample(
    url: str, started: float, limits: list[tuple[float, int]], done: threading.Event
) -> None:
    """The upstream's concurrency limit, read from the status every quarter second."""
    while not done.wait(0.25):
        (upstream, *_) = get_json(f"{url}/v1/status")["destinations"]
        limits.append((time.perf_counter() - started, upstream["concurrency_limit"]))


def post_json(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request) as response:
        response.read()


def report(capacity: int, runs: list[Run], events: int, args: argparse.Namespace) -> None:
    platform = (
        f"capacity {capacity} (queue {capacity}, 429 past {2 * capacity})"
        if capacity
        else "no capacity limit"
    )
    print(f"\nplatform: {platform}, {args.latency_ms:g} ms an envelope, {events} events")
    print("| concurrency | time | events/s | 429 answers | at the platform at once (most) |")
    print("|---|---|---|---|---|")
    for run in runs:
        time_text = f"{run.seconds:.1f} s" if run.finished else f"> {args.max_run_s:g} s"
        rate = f"{events / run.seconds:,.0f}" if run.finished else f"({run.delivered:,} sent)"
        print(
            f"| {run.label} | {time_text} | {rate} | {run.statuses.get('429', 0):,} "
            f"| {run.most_at_once} |"
        )
    adaptive = runs[-1]
    finished = [run for run in runs[:-1] if run.finished]
    if finished and adaptive.finished:
        best = min(finished, key=lambda run: run.seconds)
        print(
            f"adaptive / best fixed ({best.label}): {adaptive.seconds / best.seconds:.2f} "
            "(target: at most 1.2)"
        )
    settled = adaptive.settled()
    if settled:
        print(
            f"adaptive limit over the second half: median {statistics.median(settled):g}, "
            f"{min(settled)} to {max(settled)}"
        )
    each_second = [limit for at, limit in adaptive.limits][3::4]
    print(f"adaptive limit, each second: {' '.join(map(str, each_second))}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--capacity", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--fixed", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--ceiling", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--max-run-s", type=float, default=240.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"command: {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        backlog = tmp / "backlog.db"
        started = time.perf_counter()
        fill(backlog, args.events)
        print(f"backlog of {args.events} events written in {time.perf_counter() - started:.0f} s")
        for capacity in args.capacity:
            runs = []
            for fixed in [*args.fixed, 0]:
                run_dir = tmp / f"c{capacity}-f{fixed}"
                run_dir.mkdir()
                runs.append(drain(backlog, run_dir, args.events, capacity, args, fixed))
                print(
                    f"  capacity {capacity}, {runs[-1].label}: "
                    + (f"{runs[-1].seconds:.1f} s" if runs[-1].finished else "not finished"),
                    flush=True,
                )
                shutil.rmtree(run_dir)
            report(capacity, runs, args.events, args)


def fixed_sidecar(argv: list[str]) -> int:
    """`caliper-sidecar` with the concurrency fixed at `concurrency`, as before issue 33."""
    from caliper_sidecar import cli
    from caliper_sidecar.delivery import concurrency, dispatcher
    from caliper_sidecar.delivery.concurrency import AdaptiveConcurrency

    class Fixed(AdaptiveConcurrency):
        def __init__(self, ceiling: int, now: float) -> None:
            super().__init__(ceiling, now)
            self.limit = ceiling

        def answered(
            self, now: float, generation: int, rtt_s: float | None, *, back_pressure: bool
        ) -> int:
            return 0

        def retune(self, ceiling: int) -> None:
            self.ceiling = self.limit = ceiling

    # The dispatcher makes its limit by the name it imported.
    assert dispatcher.AdaptiveConcurrency is concurrency.AdaptiveConcurrency  # type: ignore[attr-defined]
    dispatcher.AdaptiveConcurrency = Fixed  # type: ignore[attr-defined]
    return cli.main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["fixed-sidecar"]:
        raise SystemExit(fixed_sidecar(sys.argv[2:]))
    main()
