"""Where a sidecar spends its time under single-event ingest load (issue 6).

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile_ingest.py [--batch 1] [--seconds 8] [--top 40] [--save FILE]
        [--gil]

Starts a sidecar (synchronous = "full", upstream unreachable), loads it with wrk, samples it
with py-spy, and prints the functions with the largest inclusive share of samples; `--save`
keeps every sample as collapsed stacks, each under its thread. `--gil` samples only the
thread holding the GIL, and prints each thread's share of the run's sample slots first: how
long each held it (against a run without `--gil`: how long each was busy).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

from common import free_port, sidecar, wrk

from caliper_sidecar.tools.samples import sample_events

RATE = 250  # samples a second


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--save", type=Path, help="also keep the samples here, as collapsed stacks per thread"
    )
    parser.add_argument("--gil", action="store_true", help="only the thread holding the GIL")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        event = sample_events()[6]
        event["id"] = "__ID__"
        (tmp / "event.json").write_text(json.dumps(event))
        port = free_port()
        server = sidecar(
            tmp,
            port,
            outbox={"path": str(tmp / "outbox.db")},
            upstream={"endpoint": "http://127.0.0.1:9/events/1.0/", "bearer_token": "x"},
        )
        load = threading.Thread(
            target=wrk,
            args=(server.url, tmp / "event.json"),
            kwargs={"batch": args.batch, "seconds": args.seconds + 4},
        )
        load.start()
        raw = tmp / "raw.txt"
        subprocess.run(
            [
                py_spy,
                "record",
                "-p",
                str(server.proc.pid),
                "-d",
                str(args.seconds),
                "-r",
                str(RATE),
                "--threads",
                *(["--gil"] if args.gil else []),
                "-f",
                "raw",
                "-o",
                str(raw),
            ],
            capture_output=True,
            check=True,
        )
        load.join()
        server.stop()
        if args.save:
            shutil.copy(raw, args.save)
        inclusive: Counter[str] = Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            total += int(count)
            for frame in set(stack.split(";")):
                inclusive[frame] += int(count)
    slots = args.seconds * RATE
    print(f"{slots} sample slots per thread ({args.seconds} s at {RATE} Hz); samples by thread:")
    for frame, count in inclusive.most_common():
        if frame.startswith("thread ("):
            print(f"{100 * count / slots:5.1f}%  {frame}")
    print(f"{total} samples; inclusive share")
    for frame, count in inclusive.most_common(args.top):
        print(f"{100 * count / total:5.1f}%  {frame[:140]}")


if __name__ == "__main__":
    main()
