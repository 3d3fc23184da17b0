"""Ingest of two or more checkouts of the sidecar, interleaved, each beside the bare ceiling.

    git worktree add --detach /tmp/before <commit>
    .venv/bin/python bench/ab.py /tmp/before . [--rounds 5] [--seconds 6] [--batch 1]

Each round runs the bare aiohttp handler (the HTTP ceiling), then each checkout's sidecar in
turn (its caliper_sidecar first on sys.path; the venv's dependencies serve them all), under
the same wrk load as bench/ingest.py (synchronous = "full", the reference's ViewEvent, the
upstream unreachable). Changes worth a few percent drown in this machine's noise between two
separate runs; in one interleaved run they show round after round, and each checkout's share of
the ceiling measured beside it is what BENCHMARKS.md compares. The checkouts take turns at
going first, round by round (the first after the bare handler was favoured). Each sidecar's
peak resident memory (VmHWM) over its run is printed beside its rate.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

from common import Process, checkout_command, machine, median
from ingest import bare, measure, sidecar_factory, template


def checkout_sidecar(tree: Path, tmp: Path, port: int) -> Process:
    """bench/ingest.py's sidecar ("full"), with `tree`'s caliper_sidecar first on the path."""
    return sidecar_factory("full", checkout_command(tree))(tmp, port)


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
    peaks: dict[str, list[float]] = {name: [] for name in rates}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        event = template(tmp)
        for round_ in range(args.rounds):
            # The checkouts' order turns each round: the one measured first after the bare
            # handler did better, whichever it was (two runs of 2026-12-07, orders swapped:
            # 0.409 and 0.402 first, 0.345 and 0.331 second).
            turn = round_ % len(trees)
            starts: list[tuple[str, Callable[[Path, int], Process]]] = [("bare", bare)]
            starts += [
                (str(t), functools.partial(checkout_sidecar, t))
                for t in trees[turn:] + trees[:turn]
            ]
            line = []
            for name, start in starts:
                result = measure(start, tmp, event, args.batch, args.seconds, args.connections)
                rates[name].append(result["rps"] * args.batch)
                peaks[name].append(result["peak_rss_mb"])
                line.append(f"{name}: {result['rps'] * args.batch:,.0f}")
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
            f"{median(ratios):.3f} of the ceiling in its round (median), "
            f"peak RSS {median(peaks[str(tree)]):.1f} MB"
        )


if __name__ == "__main__":
    main()
