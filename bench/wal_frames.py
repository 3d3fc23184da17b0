"""Which pages each kind of outbox commit writes, by b-tree, with SQLite alone (issue 33).

    .venv/bin/python bench/wal_frames.py [--event-bytes 780] [--events 5000]
        [--prefill 20000] [--group 4 --group 100]

bench/writes.py says how many bytes an event costs; this says where they go. An outbox file
is made with the sidecar's own schema and write functions (1 KB pages, WAL, `synchronous =
FULL`, `secure_delete = FAST`, checkpoints by hand), and after each commit the new frames of
the WAL are read: each frame is one page written, named by the b-tree that owned the page
before the run (`dbstat`; a page allocated during the run is "new"). A checkpoint every 1,000
events copies each page the WAL holds once, as the sidecar's checkpoint every second does.

  - ingest: `--events` appended in commits of `--group` events, into an outbox already
    holding `--prefill` rows (the dedupe window's worth: the id index grows with it), as
    schema 6 did (a UNIQUE index on `events.id`, a random leaf of it per event in every
    commit; its lookup and insert as released) and as the sidecar does now (schema 7: the
    rows alone, their ids indexed into `event_ids` in a commit of their own before each
    checkpoint, as `run` does about once a second; counted with ingest);
  - ack: the same events acknowledged in commits of 100 (writes.record_acks), and, for
    comparison, the acknowledgement the next step would make instead: one narrow row per
    event in a table of its own (`acked`), the event's row left as it is;
  - prune: every delivered row deleted in one transaction (writes.prune_delivered), and the
    prototype's rows (bodies still in them) deleted by seq.

With `--compress`, each body is stored compressed (raw deflate, level 6, with a dictionary of
the events TimeBack's SDK sent in tests/data, a source other than the samples measured): what
compressing bodies in the outbox would change, page by page. The samples' padding is random
text in every run, so that it compresses as little as real content would.

Bytes per event: frames × (page + 24-byte header) for the WAL, distinct pages × page size for
the checkpoint. The 4 KB pages of the page cache that a commit dirties again at the WAL's tail
are not counted (bench/writes.py counts them).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import random
import re
import sqlite3
import string
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import forward
from common import machine

from caliper_sidecar.outbox.records import NewEvent
from caliper_sidecar.outbox.sqlite import writes
from caliper_sidecar.outbox.sqlite.event_ids import index_tail
from caliper_sidecar.outbox.sqlite.schema import VERSION, migrate

PAGE = 1024
CHECKPOINT_EVERY = 1000  # events
SDK_CALLS = Path(__file__).parent.parent / "tests" / "data" / "timeback-sdk-0.4.0"
#: set by --compress: the dictionary bodies are compressed with
DICTIONARY: bytes | None = None


def sdk_dictionary() -> bytes:
    """The last 4 KB of the events TimeBack's SDK sent, as a compression dictionary."""
    events = []
    for path in sorted(SDK_CALLS.glob("sdk-calls-*.json")):
        for call in json.loads(path.read_text())["calls"]:
            body = call["request"].get("body")
            with contextlib.suppress(TypeError, ValueError, KeyError):
                events += json.loads(body)["data"] if isinstance(body, str) else body["data"]
    return b"".join(json.dumps(e, separators=(",", ":")).encode() for e in events)[-4096:]


def sample_lines(count: int) -> list[bytes]:
    """forward.events, the padding made of random letters (an "x" run compresses to nothing)."""
    letters = string.ascii_letters + string.digits

    def pad(match: re.Match[bytes]) -> bytes:
        return b'"pad":"' + "".join(random.choices(letters, k=len(match[1]))).encode() + b'"'

    return [re.sub(rb'"pad":"(x*)"', pad, line) for line in forward.events(count)]


def stored(line: bytes) -> bytes:
    """A body as the outbox would hold it."""
    if DICTIONARY is None:
        return line
    packer = zlib.compressobj(6, zlib.DEFLATED, -12, 5, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
    return packer.compress(line) + packer.flush()


class Wal:
    """The frames appended to a WAL file since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 32  # the WAL header

    def new_pages(self) -> list[int]:
        data = self.path.read_bytes() if self.path.exists() else b""
        pages = []
        while self.offset + 24 + PAGE <= len(data):
            pages.append(struct.unpack(">I", data[self.offset : self.offset + 4])[0])
            self.offset += 24 + PAGE
        return pages

    def restarted(self) -> None:
        self.offset = 32  # after a truncating checkpoint, the next commit writes from the start


def outbox(path: Path, schema: int = VERSION) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {PAGE}")
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn, upto=schema)
    for pragma in ("synchronous = FULL", "secure_delete = FAST", "wal_autocheckpoint = 0"):
        conn.execute(f"PRAGMA {pragma}")
    return conn


def append(conn: sqlite3.Connection, lines: Sequence[bytes], group: int) -> None:
    for i in range(0, len(lines), group):
        events = [NewEvent(json.loads(line)["id"], stored(line)) for line in lines[i : i + group]]
        with writes.immediate(conn):
            writes.insert_appends(conn, [(events, None)], time.time() - 100, 1, 10**9, 10**12)
            index_tail(conn)


def measure(
    conn: sqlite3.Connection,
    wal: Wal,
    label: str,
    commit: Callable[[sqlite3.Connection, Any], None],
    args: Sequence[Any],
    events: int,
    per_checkpoint: int,
    before_checkpoint: Callable[[sqlite3.Connection], object] | None = None,
) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal.restarted()
    owner = {
        page: f"{name} ({kind})"
        for name, page, kind in conn.execute("SELECT name, pageno, pagetype FROM dbstat")
    }
    frames: collections.Counter[str] = collections.Counter()
    pending: set[int] = set()
    copied = 0
    for n, arg in enumerate(args, 1):
        with writes.immediate(conn):
            commit(conn, arg)
        pages = wal.new_pages()
        checkpoint = n % per_checkpoint == 0 or n == len(args)
        if checkpoint and before_checkpoint is not None:
            with writes.immediate(conn):
                before_checkpoint(conn)
            pages += wal.new_pages()
        frames.update(owner.get(p, "new") for p in pages)
        pending.update(pages)
        if checkpoint:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            wal.restarted()
            copied += len(pending)
            pending.clear()
    total = sum(frames.values())
    wal_b, copy_b = total * (PAGE + 24) / events, copied * PAGE / events
    print(
        f"{label}: {len(args)} commits, {total / len(args):.1f} frames a commit; per event "
        f"WAL {wal_b:,.0f} + checkpoint {copy_b:,.0f} = {wal_b + copy_b:,.0f} bytes"
    )
    for name, count in frames.most_common(6):
        print(f"    {name:40} {count / len(args):8.1f} frames a commit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--event-bytes", type=int, default=forward.EVENT_BYTES)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--prefill", type=int, default=20000)
    parser.add_argument("--group", type=int, action="append")
    parser.add_argument("--compress", action="store_true", help="bodies stored compressed")
    args = parser.parse_args()
    global DICTIONARY
    DICTIONARY = sdk_dictionary() if args.compress else None
    forward.EVENT_BYTES = args.event_bytes
    n = args.events
    lines = sample_lines(1000)
    sizes = [len(line) for line in lines]
    kept = [len(stored(line)) for line in lines]
    print(
        f"# {machine()}; SQLite {sqlite3.sqlite_version}; events of {sum(sizes) / len(sizes):.0f} "
        f"bytes on average (--event-bytes {args.event_bytes}), stored in "
        f"{sum(kept) / len(kept):.0f}" + (" (compressed)" if args.compress else "")
    )
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
        for group, schema in itertools.product(args.group or [4, 100], (6, VERSION)):
            path = Path(tmp, f"ingest{group}-{schema}.db")
            conn = outbox(path, schema)
            insert = _insert_schema_6 if schema == 6 else _insert
            prefill = sample_lines(args.prefill)
            for i in range(0, len(prefill), 500):
                with writes.immediate(conn):
                    insert(conn, prefill[i : i + 500])
                    if schema != 6:
                        index_tail(conn)
            lines = sample_lines(n)
            measure(
                conn,
                Wal(Path(f"{path}-wal")),
                f"ingest, {group} a commit, over {args.prefill} rows, schema {schema}",
                insert,
                [lines[i : i + group] for i in range(0, n, group)],
                n,
                max(1, CHECKPOINT_EVERY // group),
                None if schema == 6 else index_tail,
            )
            conn.close()
        for prototype in (False, True):
            path = Path(tmp, f"ack{prototype}.db")
            conn = outbox(path)
            append(conn, sample_lines(n), 500)
            seqs = [s for (s,) in conn.execute("SELECT seq FROM events ORDER BY seq")]
            acks = [seqs[i : i + 100] for i in range(0, n, 100)]
            wal = Wal(Path(f"{path}-wal"))
            if prototype:
                conn.execute("CREATE TABLE acked (seq INTEGER PRIMARY KEY, at REAL NOT NULL)")
                measure(conn, wal, "ack into `acked`, 100 a commit", _ack_apart, acks, n, 10)
                measure(conn, wal, "prune `acked` rows", _prune_apart, [None], n, 1)
            else:
                measure(conn, wal, "ack (record_acks), 100 a commit", _ack, acks, n, 10)
                measure(conn, wal, "prune (prune_delivered)", _prune, [None], n, 1)
            conn.close()


def _insert(conn: sqlite3.Connection, lines: list[bytes]) -> None:
    events = [NewEvent(json.loads(line)["id"], stored(line)) for line in lines]
    writes.insert_appends(conn, [(events, None)], time.time(), 1, 10**9, 10**12)


#: schema 6's dedupe lookup and insert, as released (3931ce9), for comparison
_KNOWN_IDS_6 = """
    WITH wanted(id) AS (SELECT value FROM json_each(?1))
    SELECT id FROM events WHERE id IN wanted AND (delivered_at IS NULL OR delivered_at >= ?2)
    UNION ALL SELECT id FROM dead_letters WHERE id IN wanted
    UNION ALL SELECT id FROM delivered WHERE id IN wanted AND delivered_at >= ?2
"""
_PACKED_INSERT_6 = """
    INSERT OR REPLACE INTO events (id, body, size, received_at, sensor, sender)
    SELECT value ->> 0, substr(?2, value ->> 1, value ->> 2), value ->> 2, ?3, value ->> 3,
        value ->> 4
    FROM json_each(?1)
"""


def _insert_schema_6(conn: sqlite3.Connection, lines: list[bytes]) -> None:
    """What insert_appends did in a schema 6 file: the lookup, then the packed insert."""
    ids = [json.loads(line)["id"] for line in lines]
    conn.execute(_KNOWN_IDS_6, (json.dumps(ids), time.time() - 60)).fetchall()
    entries, offset, bodies = [], 1, [stored(line) for line in lines]
    for id_, body in zip(ids, bodies, strict=True):
        entries.append((id_, offset, len(body), None, None))
        offset += len(body)
    conn.execute(_PACKED_INSERT_6, (json.dumps(entries), b"".join(bodies), time.time()))


#: every acknowledgement is this old, so that pruning takes them all
_LONG_AGO = 1_000.0


def _ack(conn: sqlite3.Connection, seqs: list[int]) -> None:
    writes.record_acks(conn, [(seqs, None, None)], _LONG_AGO, None)


def _prune(conn: sqlite3.Connection, _: None) -> None:
    writes.prune_delivered(conn, _LONG_AGO + 1)


def _ack_apart(conn: sqlite3.Connection, seqs: list[int]) -> None:
    conn.execute(
        "INSERT INTO acked (seq, at) SELECT value, ? FROM json_each(?)",
        (_LONG_AGO, json.dumps(seqs)),
    )
    conn.execute("UPDATE totals SET events = events - ?", (len(seqs),))


def _prune_apart(conn: sqlite3.Connection, _: None) -> None:
    conn.execute(
        "DELETE FROM events WHERE seq IN (SELECT seq FROM acked WHERE at < ?)", (_LONG_AGO + 1,)
    )
    conn.execute("DELETE FROM acked WHERE at < ?", (_LONG_AGO + 1,))


if __name__ == "__main__":
    main()
