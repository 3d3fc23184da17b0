"""What a stopped sidecar (SIGSTOP, a frozen VM, a laptop lid) costs in duplicates (issue 10).

    .venv/bin/python bench/sigstop.py [--stop-s 8] [--timeout-s 3] [--latency-ms 300]

The fake TimeBack answers each envelope after `--latency-ms`; the sidecar has a backlog and
`upstream.timeout_s = --timeout-s`. The sidecar is stopped (SIGSTOP) while envelopes are in
flight, for longer than its timeout, then continued (SIGCONT). The platform had answered those
envelopes, but the sidecar reads the answers only after its timeout has passed, so it counts
them as failed and sends them again: at-least-once, as designed. Prints the duplicates the
platform saw, and their ceiling: what can be in flight, concurrency x batch_max_events.
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

from common import fake_and_sidecar, get_json

from caliper_sidecar.tools.samples import sample_events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stop-s", type=float, default=8.0)
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument("--events", type=int, default=4000)
    args = parser.parse_args()
    batch, concurrency = 100, 4
    with tempfile.TemporaryDirectory() as tmp:
        fake, sidecar = fake_and_sidecar(
            Path(tmp),
            upstream={
                "timeout_s": args.timeout_s,
                "batch_max_events": batch,
                "concurrency": concurrency,
            },
            retry={"initial_backoff_s": 0.1, "max_backoff_s": 1.0},
        )
        try:
            faults = json.dumps({"latency_ms": args.latency_ms}).encode()
            urllib.request.urlopen(
                urllib.request.Request(
                    f"{fake.url}/_mock/faults", faults, {"Content-Type": "application/json"}
                )
            ).read()
            events = [e for _ in range(args.events // 10) for e in sample_events()]
            for start in range(0, len(events), 500):
                body = json.dumps(events[start : start + 500]).encode()
                urllib.request.urlopen(
                    urllib.request.Request(
                        f"{sidecar.url}/v1/events", body, {"Content-Type": "application/json"}
                    )
                ).read()
            time.sleep(args.latency_ms / 1000 / 2)  # envelopes are in flight now
            sidecar.proc.send_signal(signal.SIGSTOP)
            time.sleep(args.stop_s)
            sidecar.proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 120
            while get_json(f"{fake.url}/_mock/events?ids=false")["count"] < len(events):
                if time.monotonic() > deadline:
                    raise SystemExit("not every event arrived")
                time.sleep(0.2)
            seen = get_json(f"{fake.url}/_mock/events?ids=false")
        finally:
            sidecar.stop()
            fake.stop()
    print(
        f"stopped {args.stop_s:g} s with timeout_s={args.timeout_s:g}, "
        f"platform latency {args.latency_ms:g} ms: {len(events)} events, all delivered; "
        f"duplicates at the platform: {seen['duplicates']} "
        f"(ceiling: concurrency x batch_max_events = {concurrency * batch})"
    )


if __name__ == "__main__":
    main()
