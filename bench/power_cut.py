"""Power cuts under load, simulated with LazyFS (Jepsen's method): with
`outbox.synchronous = "full"` no event answered 202 is lost.

    bench/lazyfs/build.sh SOURCE /work/lazyfs    # once: LazyFS, patched (see that script)
    .venv/bin/python bench/power_cut.py --lazyfs /work/lazyfs/build/lazyfs/lazyfs \\
        [--cuts 20] [--control] [--archive] [--seed N]

Each cut, on a fresh outbox: LazyFS is mounted over an empty directory (it keeps every write
in its own cache until an fsync writes it through); the fake TimeBack answers slowly
(`--latency-ms`), so delivery runs (claims and delivery outcomes are committed) but lags
behind ingest and events pile up; `run` keeps its outbox inside the mount; `--clients`
concurrent clients send batches of real sample events, each with a new id, and record every
id answered 202. At a random moment under load (`--min-load-s` to `--max-load-s`) the power
goes: the sidecar is SIGKILLed and, once it is gone and before anything else touches the files,
LazyFS is told `lazyfs::clear-cache` (every unsynced write vanishes) and unmounted. The files
left in the backing directory are the durable state. LazyFS is mounted again over them, the
platform answers at once, `run` is started again until `/v1/status` shows nothing waiting;
then every acknowledged id must be at the fake platform (`GET /_mock/events`) or still in the
outbox (waiting or dead-lettered). Printed per cut: acknowledged, delivered before the cut,
not durable (acknowledged ids absent from every table of the durable files, read from a copy
before the restart), lost, duplicates at the platform.

Exit 1 if a cut lost an acknowledged event with `synchronous = "full"`. `--control` runs the
same with `synchronous = "normal"` (no fsync per commit; the background checkpoint syncs the
WAL about once a second): there the cut must drop acknowledged events, else the test would
prove nothing; exit 1 if no control cut lost any. Needs /dev/fuse and fusermount3
(Debian: fuse3); run as root, or as a user allowed to mount FUSE file systems.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from common import PYTHON, Process, free_port, get_json, sidecar

from caliper_sidecar import __version__
from caliper_sidecar.tools.samples import sample_events

CLEAR_CACHE = "lazyfs::clear-cache"
CLEARED = "finished::clear-cache"


class LazyFS:
    """One LazyFS mount of `root` at `mount`, in the foreground, faults FIFO in `work`."""

    def __init__(self, binary: Path, root: Path, mount: Path, work: Path, cache: str) -> None:
        self.mount = mount
        self.fifo = work / "faults.fifo"
        self.done_fifo = work / "faults-done.fifo"
        for fifo in (self.fifo, self.done_fifo):
            if not fifo.exists():
                os.mkfifo(fifo)
        config = work / "lazyfs.toml"
        if "-o" in str(config).lower():
            # LazyFS takes a --config-path holding "-o" (any case) for a missing one.
            raise RuntimeError(f"LazyFS cannot be given a config path holding '-o': {config}")
        # No eviction: an unsynced page is never written behind the application's back, so
        # a cut loses every write not fsynced (the worst a disk's cache may do).
        config.write_text(
            f'[faults]\nfifo_path = "{self.fifo}"\nfifo_path_completed = "{self.done_fifo}"\n'
            f'[cache]\napply_eviction = false\n[cache.simple]\ncustom_size = "{cache}"\n'
            f'blocks_per_page = 1\n[filesystem]\nlog_all_operations = false\nlogfile = ""\n'
        )
        # Opened before LazyFS starts: it opens the completion FIFO for writing, which blocks
        # until a reader is there.
        self._done = os.open(self.done_fifo, os.O_RDONLY | os.O_NONBLOCK)
        self._log = open(work / "lazyfs.log", "ab")  # noqa: SIM115
        mount.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(binary), str(mount), "--config-path", str(config), "-f",
             "-o", "modules=subdir", "-o", f"subdir={root}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while not os.path.ismount(mount):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"LazyFS did not mount {mount}; see {work}/lazyfs.log")
            time.sleep(0.02)

    def clear_cache(self, timeout: float = 30) -> None:
        """Drop every write not yet fsynced; returns once LazyFS says it is done."""
        with open(self.fifo, "w") as fifo:
            fifo.write(CLEAR_CACHE + "\n")
        answer, deadline = b"", time.monotonic() + timeout
        while CLEARED.encode() not in answer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"LazyFS did not confirm {CLEAR_CACHE}")
            if select.select([self._done], [], [], left)[0]:
                answer += os.read(self._done, 256)

    def unmount(self) -> None:
        for lazy in (False, True):
            if not os.path.ismount(self.mount):
                break
            command = ["fusermount3", "-u", *(["-z"] if lazy else []), str(self.mount)]
            for _ in range(50):
                subprocess.run(command, capture_output=True, check=False)
                if not os.path.ismount(self.mount):
                    break
                time.sleep(0.1)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._done >= 0:
            os.close(self._done)
            self._done = -1
        self._log.close()


@dataclass
class Cut:
    acknowledged: int = 0
    before_cut: int = 0
    not_durable: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    waiting: int = 0
    dead: int = 0
    load_s: float = 0.0
    #: how long before the cut the last 202 had come
    quiet_ms: float = 0.0
    #: lines the sidecar logged at level error or critical, in both runs
    errors: int = 0


def post_json(url: str, body: Any) -> None:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()


async def load(
    url: str, clients: int, batch: int, load_s: float, kill: Callable[[], None], acked: set[str]
) -> float:
    """`clients` senders post batches until `kill` (the power cut) has run at `load_s`.
    Returns how long before the cut the last 202 had come, in ms (the cut's quiet time)."""
    samples = sample_events()
    cut = asyncio.Event()
    last_ack = time.monotonic()

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal last_ack
        i = n
        while not cut.is_set():
            events = []
            for _ in range(batch):
                event = dict(samples[i % len(samples)])
                event["id"] = f"urn:uuid:{uuid.uuid4()}"
                events.append(event)
                i += clients
            try:
                async with session.post(f"{url}/v1/events", json=events) as resp:
                    if resp.status == 202:
                        acked.update(e["id"] for e in events)
                        last_ack = time.monotonic()
                    elif resp.status == 503:
                        await asyncio.sleep(0.05)
                    else:
                        raise RuntimeError(f"{resp.status}: {await resp.text()}")
            except (aiohttp.ClientError, OSError):
                if not cut.is_set():
                    await asyncio.sleep(0.02)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        senders = [asyncio.create_task(one(session, n)) for n in range(clients)]
        await asyncio.sleep(load_s)
        quiet_ms = (time.monotonic() - last_ack) * 1000
        await asyncio.to_thread(kill)
        cut.set()
        await asyncio.gather(*senders)
    return quiet_ms


def ids_in(db: Path, query: str) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {row[0] for row in conn.execute(query)}
    finally:
        conn.close()


def durable_ids(root: Path, work: Path) -> set[str]:
    """Every id in the durable files (any table). They are copied to work/durable, kept as they
    were, and read from another copy: opening the database recovers and checkpoints its WAL,
    which must change neither what the restarted sidecar finds nor the evidence."""
    shutil.copytree(root, work / "durable")
    shutil.copytree(root, work / "durable-read")
    db = work / "durable-read" / "outbox.db"
    if not db.exists() or db.stat().st_size == 0:
        return set()
    found = ids_in(
        db,
        "SELECT id FROM events UNION SELECT id FROM dead_letters UNION SELECT id FROM delivered",
    )
    shutil.rmtree(work / "durable-read")
    return found


def archived_ids(archive: Path) -> set[str]:
    """The ids in an archive destination's hour files (each must read whole with gzip)."""
    found: set[str] = set()
    for path in archive.rglob("*.ndjson.gz"):
        with gzip.open(path, "rt") as lines:
            found.update(json.loads(line)["id"] for line in lines)
    return found


def wait_drained(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = get_json(f"{url}/v1/status")
        others = status.get("destinations", [])
        if (
            status["outbox"]["events"] == 0
            and status["upstream"]["in_flight"] == 0
            and all(d["waiting"] == 0 for d in others)
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"still waiting after {timeout:g} s: {status}")
        time.sleep(0.2)


def one_cut(args: argparse.Namespace, work: Path, rng: random.Random) -> Cut:
    root, mount = work / "root", work / "mnt"
    root.mkdir(parents=True)
    result = Cut(load_s=round(rng.uniform(args.min_load_s, args.max_load_s), 2))
    lazyfs: LazyFS | None = None
    fake: Process | None = None
    server: Process | None = None
    try:
        lazyfs = LazyFS(args.lazyfs, root, mount, work, args.cache)
        fake_port = free_port()
        fake = Process(
            [PYTHON, "-m", "caliper_sidecar", "mock-upstream", "--port", str(fake_port),
             "--ids-only", "--latency-ms", str(args.latency_ms)],
            fake_port,
            log=work / "fake.log",
        )  # fmt: skip
        sections: dict[str, dict[str, Any]] = {
            "outbox": {"path": str(mount / "outbox.db"), "synchronous": args.synchronous},
            "upstream": {
                "endpoint": f"{fake.url}/events/1.0/",
                "batch_max_events": 100,
                "concurrency": 2,
                "timeout_s": 10,
            },
            "oauth": {
                "token_url": f"{fake.url}/auth/1.0/token",
                "client_id": "sidecar",
                "client_secret": "sidecar-secret",
            },
            "retry": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0},
            "log": {"level": "warning"},
        }
        if args.archive:
            sections["destinations"] = [
                {"name": "archive", "kind": "archive", "dir": str(mount / "archive")}
            ]
        server = sidecar(work, free_port(), **sections)
        running, mounted = server, lazyfs

        def power_cut() -> None:
            running.proc.send_signal(signal.SIGKILL)
            running.proc.wait()  # gone: its FUSE requests have all been answered
            mounted.clear_cache()

        acked: set[str] = set()
        result.quiet_ms = asyncio.run(
            load(server.url, args.clients, args.batch, result.load_s, power_cut, acked)
        )
        server.stop()  # closes its log
        server = None
        lazyfs.unmount()
        lazyfs = None
        result.acknowledged = len(acked)
        result.before_cut = len(acked & set(get_json(f"{fake.url}/_mock/events")["ids"]))
        result.not_durable = len(acked - durable_ids(root, work))

        # Power back: the platform answers at once, the sidecar drains what survived.
        lazyfs = LazyFS(args.lazyfs, root, mount, work, args.cache)
        post_json(f"{fake.url}/_mock/faults", {"latency_ms": 0})
        server = sidecar(work, free_port(), **sections)
        wait_drained(server.url, args.drain_timeout_s)
        seen = get_json(f"{fake.url}/_mock/events")
        server.stop()
        server = None
        lazyfs.unmount()
        lazyfs = None
        # Read from the backing directory: what is durable is all there is to check now.
        db = root / "outbox.db"
        waiting = ids_in(db, "SELECT id FROM events WHERE delivered_at IS NULL")
        dead = ids_in(db, "SELECT id FROM dead_letters")
        result.waiting, result.dead = len(acked & waiting), len(acked & dead)
        result.lost = sorted(acked - set(seen["ids"]) - waiting - dead)
        if args.archive:
            # Every acknowledged event must be in the archive too (it never refuses).
            result.lost += sorted(acked - archived_ids(root / "archive"))
        result.duplicates = int(seen["duplicates"])
        result.errors = sum(
            1
            for log in work.glob("sidecar-*.log")
            for line in log.read_text().splitlines()
            if '"level":"error"' in line or '"level":"critical"' in line
        )
        return result
    finally:
        for process in (server, fake):
            if process is not None:
                process.proc.kill()
                process.stop()
        if lazyfs is not None:
            lazyfs.unmount()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lazyfs", type=Path, required=True, help="the built lazyfs binary")
    parser.add_argument("--cuts", type=int, default=20)
    parser.add_argument(
        "--archive",
        action="store_true",
        help="an archive destination in the same mount: every acknowledged event must also "
        "be in its files, each read whole with gzip (the torn member a cut leaves repaired)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help='outbox.synchronous = "normal": acknowledged events are expected to be lost',
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent senders")
    parser.add_argument("--batch", type=int, default=10, help="events per request")
    parser.add_argument("--min-load-s", type=float, default=1.5)
    parser.add_argument("--max-load-s", type=float, default=5.0)
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=200.0,
        help="the fake platform's answer time while loaded (delivery runs, but lags)",
    )
    parser.add_argument("--cache", default="256mb", help="LazyFS's cache size")
    parser.add_argument("--drain-timeout-s", type=float, default=120.0)
    parser.add_argument("--deadline-s", type=float, default=1800.0, help="for the whole run")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory (kept anyway when full mode loses an event)",
    )
    args = parser.parse_args()
    args.synchronous = "normal" if args.control else "full"
    if not args.lazyfs.is_file():
        sys.exit(f"{args.lazyfs}: no such file; build it with bench/lazyfs/build.sh")
    if shutil.which("fusermount3") is None:
        sys.exit("this benchmark needs fusermount3: apt-get install fuse3")
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    print(
        f"caliper-sidecar {__version__}, synchronous = {args.synchronous!r}, {args.cuts} cuts, "
        f"{args.clients} clients x {args.batch} events, platform latency "
        f"{args.latency_ms:g} ms while loaded, seed {seed}"
        + (", with an archive destination" if args.archive else "")
    )
    work = Path(tempfile.mkdtemp(prefix="power_cut_"))  # no "-o" in it (see LazyFS)
    started = time.monotonic()
    cuts: list[Cut] = []
    keep = args.keep
    try:
        for i in range(args.cuts):
            if time.monotonic() - started > args.deadline_s:
                print(f"deadline of {args.deadline_s:g} s reached after {i} cuts")
                break
            cut = one_cut(args, work / f"cut-{i + 1:02d}", rng)
            cuts.append(cut)
            print(
                f"cut {i + 1:2d} after {cut.load_s:4.2f} s (last 202 {cut.quiet_ms:3.0f} ms "
                f"before): acknowledged {cut.acknowledged:6d}, "
                f"delivered before the cut {cut.before_cut:6d}, not durable "
                f"{cut.not_durable:5d}, lost {len(cut.lost):5d}, dead letters {cut.dead}, "
                f"duplicates at the platform {cut.duplicates}, errors logged {cut.errors}",
                flush=True,
            )
            if cut.lost and not args.control:
                # What a developer needs to look into it: the ids, and the files kept.
                (work / f"cut-{i + 1:02d}" / "lost.txt").write_text("\n".join(cut.lost) + "\n")
                keep = True
                for event_id in cut.lost[:20]:
                    print(f"    lost: {event_id}")
    finally:
        if keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    lost = sum(len(c.lost) for c in cuts)
    losing = sum(1 for c in cuts if c.lost)
    print(
        f"total ({args.synchronous}): {len(cuts)} cuts, acknowledged "
        f"{sum(c.acknowledged for c in cuts)}, not durable {sum(c.not_durable for c in cuts)} "
        f"(in {sum(1 for c in cuts if c.not_durable)} cuts), lost {lost} "
        f"(in {losing} cuts), duplicates at the platform {sum(c.duplicates for c in cuts)}"
    )
    if args.control:
        if losing == 0:
            print("the control lost nothing: these cuts did not drop unsynced writes")
            sys.exit(1)
    elif lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
