"""End-to-end forwarding against a C peer, side by side in one run (issue 13).

    .venv/bin/python bench/forward.py [--events 100000] [--senders 8] [--rounds 1]

The same events (~1.1 KB TimeBack samples, each with a new id) go through two forwarders to
the same HTTP sink (`bench/servers.py sink`, which counts the events of each envelope):

  - syslog-ng with a reliable disk buffer: events as JSON lines over `--senders` TCP
    connections, forwarded by its http() destination in 100-event bodies (`{"data": [...]}`);
  - caliper-sidecar (`synchronous = "full"`, strict validation): 100-event POSTs to
    /v1/events from `--senders` concurrent senders, each waiting for its 202 (the sidecar
    answers only after the commit), forwarded in 100-event envelopes.

Time runs from the first byte sent to the sink counting the last event. Each forwarder's
fsync and fdatasync calls are counted by bench/fsync_count.c, preloaded (compiled here with
cc): `strace -f -c` stalled syslog-ng's http() destination half-way through every run.
Needs syslog-ng and a C compiler:

    apt-get install syslog-ng-core syslog-ng-mod-http gcc

`--checkout PATH` (again for more) runs that checkout's sidecar instead of this one's, each in
turn in every round: an interleaved A/B. `--only caliper-sidecar --profile FILE` records the
sidecar's run with py-spy, every thread, as collapsed stacks (sampling slows it: the shares
tell where the time goes, not the rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from common import PYTHON, Process, checkout_command, free_port, get_json, machine, median

from caliper_sidecar.tools.samples import sample_events

EVENT_BYTES = 1100


def require_tools() -> None:
    missing = [tool for tool in ("syslog-ng", "cc") if shutil.which(tool) is None]
    if missing:
        sys.exit(
            f"this benchmark needs {' and '.join(missing)}: "
            "apt-get install syslog-ng-core syslog-ng-mod-http gcc"
        )


def events(count: int) -> list[bytes]:
    """`count` sample events of about EVENT_BYTES each, serialized, each with a new id."""
    samples = sample_events()
    out = []
    for i in range(count):
        event = dict(samples[i % len(samples)])
        event["id"] = f"urn:uuid:{uuid.uuid4()}"
        body = json.dumps(event, separators=(",", ":"))
        pad = max(0, EVENT_BYTES - len(body) - len(',"extensions":{"pad":""}'))
        event["extensions"] = {**event.get("extensions", {}), "pad": "x" * pad}
        out.append(json.dumps(event, separators=(",", ":")).encode())
    return out


def counter(tmp: Path) -> Path:
    """bench/fsync_count.c built as a shared library."""
    library = tmp / "fsync_count.so"
    if not library.exists():
        source = Path(__file__).with_name("fsync_count.c")
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"],
                       check=True)  # fmt: skip
    return library


def counted(tmp: Path, work: Path) -> dict[str, str]:
    """The environment that counts a forwarder's fsyncs into work/fsyncs."""
    return {"LD_PRELOAD": str(counter(tmp)), "FSYNC_COUNT_FILE": str(work / "fsyncs")}


def sync_calls(work: Path) -> int:
    """fsync + fdatasync calls of the forwarder (and any process it started)."""
    return sum(int(line.split()[1]) for line in (work / "fsyncs").read_text().splitlines())


def start_sink(work: Path) -> Process:
    port = free_port()
    return Process(
        [PYTHON, "bench/servers.py", "sink", "--port", str(port)], port, log=work / "sink.log"
    )


def wait_for_sink(sink: Process, count: int, stalled_s: float = 15) -> tuple[float, int]:
    """When the sink had every event (perf_counter), and how many it had: when it stops
    getting any for `stalled_s`, the time of the last one and what it had then."""
    seen, last = -1, time.perf_counter()
    while True:
        events = int(get_json(f"{sink.url}/count")["events"])
        if events != seen:
            seen, last = events, time.perf_counter()
        if events >= count or time.perf_counter() - last > stalled_s:
            return last, events
        time.sleep(0.05)


def outcome(started: float, sink: Process, work: Path, count: int) -> dict[str, float]:
    finished, received = wait_for_sink(sink, count)
    if received < count:
        print(f"  ! {count - received} events never reached the sink; see {work}/sink.log:")
        print("    " + (work / "sink.log").read_text()[-600:].replace("\n", "\n    "))
    return {"seconds": finished - started, "received": received}


SYSLOG_NG_CONF = """@version: 3.38
options {{ threaded(yes); log-msg-size(65536); stats-freq(0); }};
source s_events {{
    network(ip("127.0.0.1") port({port}) transport("tcp") flags(no-parse)
            max-connections(64) log-iw-size(100000));
}};
destination d_sink {{
    http(url("{sink}/events") method("POST") headers("Content-Type: application/json")
         body-prefix('{{"data":[') delimiter(",") body-suffix("]}}") body("${{MESSAGE}}")
         batch-lines(100) batch-timeout(200) workers(4)
         disk-buffer(reliable(yes) disk-buf-size(2147483648) mem-buf-size(209715200)
                     dir("{dir}")));
}};
log {{ source(s_events); destination(d_sink); flags(flow-control); }};
"""


async def send_lines(port: int, lines: list[bytes], senders: int) -> None:
    async def one(part: list[bytes]) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\n".join(part) + b"\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(one(lines[i::senders]) for i in range(senders)))


def run_syslog_ng(tmp: Path, lines: list[bytes], senders: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(dir=tmp))
    sink = start_sink(work)
    port = free_port()
    conf = work / "syslog-ng.conf"
    conf.write_text(SYSLOG_NG_CONF.format(port=port, sink=sink.url, dir=work))
    args = ["syslog-ng", "-F", "--no-caps", "-f", str(conf), "-R", str(work / "persist"),
            "-p", str(work / "pid"), "-c", str(work / "ctl")]  # fmt: skip
    forwarder = Process(args, port, env=counted(tmp, work), log=work / "syslog-ng.log")
    try:
        started = time.perf_counter()
        asyncio.run(send_lines(port, lines, senders))
        result = outcome(started, sink, work, len(lines))
    finally:
        forwarder.stop()
        sink.stop()
    return {**result, "syncs": sync_calls(work)}


async def post_batches(url: str, lines: list[bytes], senders: int, batch: int) -> None:
    """POST `lines` to /v1/events, `batch` to a request (1: each event alone, not in an
    array), from `senders` concurrent senders, each waiting for its 202 (503: again)."""
    bodies = [
        lines[i] if batch == 1 else b"[" + b",".join(lines[i : i + batch]) + b"]"
        for i in range(0, len(lines), batch)
    ]
    queue = iter(bodies)

    async def one(session: aiohttp.ClientSession) -> None:
        for body in queue:
            while True:
                async with session.post(
                    f"{url}/v1/events", data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    if resp.status == 202:
                        break
                    if resp.status != 503:
                        raise RuntimeError(f"{resp.status}: {await resp.text()}")
                await asyncio.sleep(0.1)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session) for _ in range(senders)))


def run_sidecar(
    tmp: Path,
    lines: list[bytes],
    senders: int,
    profile: Path | None = None,
    checkout: Path | None = None,
) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(dir=tmp))
    sink = start_sink(work)
    port = free_port()
    config = work / "sidecar.toml"
    config.write_text(
        f"[receiver]\nport = {port}\n"
        f'[outbox]\npath = "{work / "outbox.db"}"\nsynchronous = "full"\n'
        f'[upstream]\nendpoint = "{sink.url}/events"\nbearer_token = "bench"\n'
        "batch_max_events = 100\n"
        '[log]\nlevel = "warning"\n'
    )
    args = [PYTHON, *checkout_command(checkout), "run", "-c", str(config)]
    forwarder = Process(args, port, env=counted(tmp, work), log=work / "sidecar.log")
    spy = None
    if profile is not None:
        # Attached to the running sidecar, every thread, without pausing it for each sample.
        spy = subprocess.Popen(
            [
                str(Path(PYTHON).parent / "py-spy"),
                "record",
                "--pid",
                str(forwarder.proc.pid),
                "--threads",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(profile),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)  # py-spy attaches
    try:
        started = time.perf_counter()
        asyncio.run(post_batches(forwarder.url, lines, senders, 100))
        result = outcome(started, sink, work, len(lines))
    finally:
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes what it recorded
            spy.wait(timeout=30)
        forwarder.stop()
        sink.stop()
    return {**result, "syncs": sync_calls(work)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", choices=("syslog-ng", "caliper-sidecar"))
    parser.add_argument(
        "--profile",
        type=Path,
        help="record the sidecar's run with py-spy (.venv/bin/pip install py-spy) into this "
        "file, as collapsed stacks per thread (with several --checkout, the last run's)",
    )
    parser.add_argument(
        "--checkout",
        type=Path,
        action="append",
        help="the sidecar of this checkout instead of this one's (again for more: each round "
        "runs them one after the other, an A/B)",
    )
    args = parser.parse_args()
    require_tools()
    lines = events(args.events)
    checkouts: dict[str, Path | None] = {"caliper-sidecar": None}
    if args.checkout:
        checkouts = {f"caliper-sidecar {c}": c for c in args.checkout}
    results: dict[str, list[dict[str, float]]] = {"syslog-ng": [], **{n: [] for n in checkouts}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for round_ in range(args.rounds):
            if args.only != "caliper-sidecar":
                results["syslog-ng"].append(run_syslog_ng(tmp, lines, args.senders))
            if args.only != "syslog-ng":
                # the checkouts take turns at going first, round by round (as bench/ab.py)
                order = list(checkouts.items())
                turn = round_ % len(order)
                said = []
                for name, checkout in order[turn:] + order[:turn]:
                    run = run_sidecar(tmp, lines, args.senders, args.profile, checkout)
                    results[name].append(run)
                    said.append(f"{name}: {run['received'] / run['seconds']:,.0f}")
                print(f"round {round_ + 1}: " + "; ".join(said), flush=True)
    results = {name: runs for name, runs in results.items() if runs}
    size = sum(map(len, lines)) / len(lines)
    print(
        f"machine: {machine()}; {args.events} events of {size:.0f} bytes, "
        f"{args.senders} senders, 100-event envelopes, {args.rounds} round(s), medians"
    )
    print(
        f"  {'forwarder':18s} {'events/s':>10s} {'seconds':>8s} {'fsyncs/1000 events':>19s} "
        f"{'never arrived':>14s}"
    )
    rate: dict[str, float] = {}
    for name, runs in results.items():
        seconds = median([r["seconds"] for r in runs])
        rate[name] = median([r["received"] for r in runs]) / seconds
        syncs = median([r["syncs"] for r in runs]) * 1000 / args.events
        lost = [args.events - int(r["received"]) for r in runs]
        print(f"  {name:18s} {rate[name]:10.0f} {seconds:8.2f} {syncs:19.1f} {lost!s:>14s}")
    for name in checkouts:
        if name in rate and "syslog-ng" in rate:
            print(
                f"  {name} / syslog-ng: {rate[name] / rate['syslog-ng']:.2f} "
                "(target 0.25, at most 20 fsyncs per 1,000 events)"
            )


if __name__ == "__main__":
    main()
