"""What bodies kept in append-only segment files would write per event (issue 33, target 1).

    .venv/bin/python bench/segments.py [--events 5000] [--event-bytes 1100] [--group 4
        --group 100] [--index-every 1000]

A measurement before a choice, not the sidecar: the outbox's SQLite write functions (schema
7, 1 KB pages, WAL, `synchronous = FULL`, `secure_delete = FAST`), driven in this process on
the disk of the checkout, and the bytes this process caused the device to write
(`/proc/self/io` `write_bytes`, 4 KB pages as the kernel writes them back, so that a commit
that dirties the tail page of a file again is counted again) read around each phase of an
event's life: ingest in commits of `--group` events, each made durable before the next (as
an answer waits for its commit), acknowledgement in commits of 100, pruning. Three designs:

  - `outbox now`: the rows hold the bodies (writes.insert_appends, record_acks,
    prune_delivered; event ids indexed and the WAL checkpointed every `--index-every`
    events, as `run` does once a second);
  - `segments, rows in the commit`: each commit appends its bodies (a small header each) to
    a segment file and fsyncs it, then commits the rows without their bodies as now: two
    fsyncs an answer, every row's pages in every commit;
  - `segments, rows late`: each commit appends and fsyncs the segment only; the rows are
    written every `--index-every` events in one transaction (as event ids are now), so that
    after a crash the segment's tail past the last indexed record is read again. Nothing of
    the table is written per answer.

Segments are 4 MB files; pruning deletes the rows and every segment whose events are all
delivered (a segment's events are pruned together: it was written in their order).

Two more, with bodies compressed (raw deflate with a dictionary of the events TimeBack's SDK
sent, as `bench/wal_frames.py --compress`): `compressed`, the rows holding them as now; and
`apart`, compressed bodies in a table of their own, deleted at acknowledgement (so that the
acknowledgement rewrites the narrow rows, not the bodies' pages). `--designs` picks.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import forward
import wal_frames
from common import machine

from caliper_sidecar.outbox.records import NewEvent
from caliper_sidecar.outbox.sqlite import writes
from caliper_sidecar.outbox.sqlite.event_ids import index_tail

SEGMENT_BYTES = 4 * 1024 * 1024
#: every record: length, CRC-32 of what follows, seq; then the id's length, the id, the body
HEADER = struct.Struct(">IIQH")


def write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes")


class Segments:
    """Append-only files of records, each fsynced before the commit is answered."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.number = 0
        self.size = 0
        self.fd = self._open()
        self.last_seq_of: dict[int, int] = {}  # segment -> its newest seq

    def _open(self) -> int:
        path = self.folder / f"{self.number:08d}.seg"
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append(self, records: list[tuple[int, bytes, bytes]]) -> None:
        chunks = []
        for seq, id_, body in records:
            payload = struct.pack(">Q", seq) + len(id_).to_bytes(2, "big") + id_ + body
            chunks.append(HEADER.pack(len(payload), zlib.crc32(payload), seq, len(id_)))
            chunks.append(payload)
            self.last_seq_of[self.number] = seq
        data = b"".join(chunks)
        os.write(self.fd, data)
        os.fsync(self.fd)
        self.size += len(data)
        if self.size >= SEGMENT_BYTES:
            os.close(self.fd)
            self.number += 1
            self.size = 0
            self.fd = self._open()

    def prune(self, delivered_upto: int) -> None:
        for number, last in list(self.last_seq_of.items()):
            if number != self.number and last <= delivered_upto:
                (self.folder / f"{number:08d}.seg").unlink()
                del self.last_seq_of[number]


def new_events(
    lines: list[bytes], with_bodies: bool, pack: Callable[[bytes], bytes] = bytes
) -> list[NewEvent]:
    return [NewEvent(json.loads(line)["id"], pack(line) if with_bodies else b"-") for line in lines]


def packer() -> Callable[[bytes], bytes]:
    dictionary = wal_frames.sdk_dictionary()

    def pack(line: bytes) -> bytes:
        deflate = zlib.compressobj(6, zlib.DEFLATED, -12, 5, zlib.Z_DEFAULT_STRATEGY, dictionary)
        return deflate.compress(line) + deflate.flush()

    return pack


def insert(conn: sqlite3.Connection, events: list[NewEvent]) -> None:
    writes.insert_appends(conn, [(events, None)], time.time(), 1, 10**9, 10**12)


def life(
    folder: Path,
    lines: list[bytes],
    group: int,
    index_every: int,
    design: str,
) -> tuple[int, int, int]:
    """Bytes written by ingest, acknowledgement and pruning of `lines`."""
    conn = wal_frames.outbox(folder / "outbox.db")
    segments = Segments(folder) if design in ("commit", "late") else None
    pack = packer() if design in ("compressed", "apart") else bytes
    if design == "apart":
        conn.execute("CREATE TABLE bodies (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    seq = 0
    late: list[NewEvent] = []

    def index() -> None:
        with writes.immediate(conn):
            if late:
                insert(conn, late)
                late.clear()
            index_tail(conn)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    before = write_bytes()
    for i in range(0, len(lines), group):
        chunk = lines[i : i + group]
        if segments is not None:
            ids = [json.loads(line)["id"].encode() for line in chunk]
            numbered = enumerate(zip(ids, chunk, strict=True), seq + 1)
            segments.append([(n, id_, body) for n, (id_, body) in numbered])
        seq += len(chunk)
        if design == "late":
            late += new_events(chunk, with_bodies=False)
        elif design == "apart":
            with writes.immediate(conn):
                insert(conn, new_events(chunk, with_bodies=False))
                conn.executemany(
                    "INSERT INTO bodies (seq, body) VALUES (?, ?)",
                    [(n, pack(line)) for n, line in enumerate(chunk, seq - len(chunk) + 1)],
                )
        else:
            bodies = design in ("now", "compressed")
            with writes.immediate(conn):
                insert(conn, new_events(chunk, with_bodies=bodies, pack=pack))
        if seq % index_every < group:
            index()
    index()
    ingest = write_bytes() - before

    before = write_bytes()
    seqs = [s for (s,) in conn.execute("SELECT seq FROM events ORDER BY seq")]
    for i in range(0, len(seqs), 100):
        with writes.immediate(conn):
            writes.record_acks(conn, [(seqs[i : i + 100], None, None)], 1_000.0, None)
            if design == "apart":
                conn.execute(
                    "DELETE FROM bodies WHERE seq IN (SELECT value FROM json_each(?))",
                    (json.dumps(seqs[i : i + 100]),),
                )
        if (i // 100) % 10 == 9:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ack = write_bytes() - before

    before = write_bytes()
    while True:
        with writes.immediate(conn):
            done = writes.prune_delivered(conn, 1_001.0, False)
        if done:
            break
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if segments is not None:
        segments.append([(seq + 1, b"x", b"")])  # a new segment starts: the old ones can go
        segments.prune(seq)
    prune = write_bytes() - before
    conn.close()
    return ingest, ack, prune


DESIGNS: dict[str, str] = {
    "now": "outbox now",
    "commit": "segments, rows in the commit",
    "late": "segments, rows late",
    "compressed": "bodies compressed, in the rows",
    "apart": "bodies compressed, in a table of their own",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--event-bytes", type=int, default=forward.EVENT_BYTES)
    parser.add_argument("--group", type=int, action="append")
    parser.add_argument("--index-every", type=int, default=1000)
    parser.add_argument("--designs", nargs="+", choices=DESIGNS, default=["now", "commit", "late"])
    args = parser.parse_args()
    forward.EVENT_BYTES = args.event_bytes
    lines = wal_frames.sample_lines(args.events)
    size = sum(map(len, lines)) / len(lines)
    print(
        f"# {machine()}; SQLite {sqlite3.sqlite_version}; {args.events} events of {size:.0f} "
        f"bytes; rows indexed every {args.index_every} events; bytes written per event"
    )
    print("| design | events a commit | ingest | acknowledgement | pruning | life | × event |")
    print("|---|---|---|---|---|---|---|")
    run: Callable[..., tuple[int, int, int]] = life
    for group in args.group or [4, 100]:
        for design in args.designs:
            label = DESIGNS[design]
            with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
                ingest, ack, prune = run(Path(tmp), lines, group, args.index_every, design)
            n = len(lines)
            whole = (ingest + ack + prune) / n
            print(
                f"| {label} | {group} | {ingest / n:,.0f} | {ack / n:,.0f} | {prune / n:,.0f} "
                f"| {whole:,.0f} | {whole / size:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
