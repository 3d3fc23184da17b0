"""Ingest of two or more checkouts of the sidecar, interleaved, each beside the bare ceiling.

    git worktree add --detach /tmp/before <commit>
    .venv/bin/python bench/ab.py /tmp/before . [--rounds 5] [--seconds 6] [--batch 1]

Each round runs the bare aiohttp handler (the HTTP ceiling), then each checkout's sidecar in
turn (PYTHONPATH puts its caliper_sidecar first; the venv's dependencies serve them all), under
the same wrk load as bench/ingest.py (synchronous = "full", the reference's ViewEvent, the
upstream unreachable). Changes worth a few percent drown in this machine's noise between two
separate runs; in one interleaved run they show round after round, and each checkout's share of
the ceiling measured beside it is what BENCHMARKS.md compares.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from common import PYTHON, Process, free_port, machine, median, wrk
from ingest import WARMUP_S, bare, template


def checkout_sidecar(tree: Path, tmp: Path, port: int) -> Process:
    config = tmp / f"sidecar-{port}.toml"
    config.write_text(
        f'[receiver]\nport = {port}\n[outbox]\npath = "{tmp / f"outbox-{port}.db"}"\n'
        'synchronous = "full"\n[upstream]\nendpoint = "http://127.0.0.1:9/events/1.0/"\n'
        'bearer_token = "x"\n'
    )
    os.environ["PYTHONPATH"] = str(tree)
    try:
        return Process(
            [PYTHON, "-m", "caliper_sidecar", "run", "-c", str(config)],
            port,
            log=tmp / f"sidecar-{port}.log",
        )
    finally:
        del os.environ["PYTHONPATH"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts of caliper-sidecar")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1, help="events per request")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    rates: dict[str, list[float]] = {"bare": [], **{str(t): [] for t in trees}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        event = template(tmp)
        for round_ in range(args.rounds):
            starts = [("bare", lambda port: bare(tmp, port))] + [
                (str(t), lambda port, t=t: checkout_sidecar(t, tmp, port)) for t in trees
            ]
            line = []
            for name, start in starts:
                port = free_port()
                server = start(port)
                try:
                    wrk(
                        server.url,
                        event,
                        batch=args.batch,
                        connections=args.connections,
                        seconds=WARMUP_S,
                    )
                    rps = wrk(
                        server.url,
                        event,
                        batch=args.batch,
                        connections=args.connections,
                        seconds=args.seconds,
                    )["rps"]
                finally:
                    server.stop()
                rates[name].append(rps * args.batch)
                line.append(f"{name}: {rps * args.batch:,.0f}")
            print(f"round {round_ + 1}: " + "; ".join(line), flush=True)
    ceiling = median(rates["bare"])
    print(
        f"\nmachine: {machine()}; {args.rounds} rounds of {args.seconds} s, batches of "
        f"{args.batch}, {args.connections} connections; medians, events/s"
    )
    print(f"  {'bare aiohttp (ceiling)':40s} {ceiling:10,.0f}")
    for tree in trees:
        ratios = [r / b for r, b in zip(rates[str(tree)], rates["bare"], strict=True)]
        print(
            f"  {tree!s:40s} {median(rates[str(tree)]):10,.0f}   "
            f"{median(ratios):.3f} of the ceiling in its round (median)"
        )


if __name__ == "__main__":
    main()
