"""Does a dead destination slow the others? [upstream]'s drain of a backlog, side by side in one
run: without [[destinations]], with a second Caliper destination that takes everything, and with
one that is down (nothing listens on its port) — interleaved, each several times (issue 30).

    .venv/bin/python bench/destinations.py [--events 200000] [--rounds 3]

Each run writes the backlog straight into a new outbox file, with the destinations' places set
at the start of the queue (as if they had been configured before the events came), starts the
fake TimeBack (`mock-upstream --ids-only`) and `caliper-sidecar run`, and times [upstream]'s
drain until the fake has every event; with a healthy destination, also until its own fake has
them all. Prints the median events/s of each case.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from common import PYTHON, Process, free_port, get_json, machine
from delivery import fill

CASES = ("none", "healthy", "down")


def run(case: str, events: int) -> tuple[float, float | None]:
    """[upstream]'s events/s, and the healthy destination's (None in the other cases)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        outbox = tmp / "outbox.db"
        fill(outbox, events)
        fakes = [_fake(), _fake()] if case == "healthy" else [_fake()]
        upstream_fake = fakes[0]
        destination = ""
        if case != "none":
            if case == "healthy":
                endpoint = f"{fakes[1].url}/events/1.0/"
            else:
                endpoint = f"http://127.0.0.1:{free_port()}/caliper"  # nothing listens
            destination = (
                "[[destinations]]\n"
                'name = "district"\nkind = "caliper"\n'
                f'endpoint = "{endpoint}"\nbearer_token = "district-token-0123456789"\n'
                "linger_ms = 0\n"
            )
            conn = sqlite3.connect(outbox)
            conn.execute("INSERT INTO destinations (name, position) VALUES ('district', 0)")
            conn.commit()
            conn.close()
        port = free_port()
        config = tmp / "sidecar.toml"
        config.write_text(
            f"[receiver]\nport = {port}\n"
            f'[outbox]\npath = "{outbox}"\nmax_events = {events + 1}\n'
            f'[upstream]\nendpoint = "{upstream_fake.url}/events/1.0/"\nlinger_ms = 0\n'
            f'[oauth]\ntoken_url = "{upstream_fake.url}/auth/1.0/token"\n'
            'client_id = "sidecar"\nclient_secret = "sidecar-secret"\n' + destination
        )
        server = Process(
            [PYTHON, "-m", "caliper_sidecar", "run", "-c", str(config)],
            port,
            log=tmp / "sidecar.log",
        )
        try:
            started = time.perf_counter()
            upstream_s = healthy_s = None
            while upstream_s is None or (case == "healthy" and healthy_s is None):
                if upstream_s is None and _count(upstream_fake) >= events:
                    upstream_s = time.perf_counter() - started
                if case == "healthy" and healthy_s is None and _count(fakes[1]) >= events:
                    healthy_s = time.perf_counter() - started
                time.sleep(0.2)
        finally:
            server.stop()
            for fake in fakes:
                fake.stop()
    return events / upstream_s, None if healthy_s is None else events / healthy_s


def _fake() -> Process:
    port = free_port()
    return Process(
        [PYTHON, "-m", "caliper_sidecar", "mock-upstream", "--port", str(port), "--ids-only"],
        port,
    )


def _count(fake: Process) -> int:
    return int(get_json(f"{fake.url}/_mock/events?ids=false")["count"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    upstream: dict[str, list[float]] = {case: [] for case in CASES}
    healthy: list[float] = []
    for round_ in range(args.rounds):
        for case in CASES:  # interleaved: a noisy minute hits every case alike
            rate, second = run(case, args.events)
            upstream[case].append(rate)
            if second is not None:
                healthy.append(second)
            print(f"round {round_ + 1} {case:8} upstream {rate:9,.0f} events/s", flush=True)
    print(f"machine: {machine()}; {args.events} events a run, {args.rounds} rounds")
    for case in CASES:
        print(
            f"[upstream] with destination {case:8}: median "
            f"{statistics.median(upstream[case]):9,.0f} events/s"
        )
    print(f"the healthy destination itself: median {statistics.median(healthy):9,.0f} events/s")


if __name__ == "__main__":
    main()
