"""Docs that run: every shell block in README.md and docs/ is run here, or says why not.

The conventions (docs/architecture.md, "Development", says them to contributors):

- A ```sh (or bash, shell) block holds commands to run: each must exit 0.
- A ```console block is a transcript: `$ ` starts a command, the lines after it are what it
  prints (stdout and stderr, as a terminal shows them), and the command must exit 0; one
  meant to fail shows it (`; echo "exit $?"`). `…` in a shown line stands for any text, and a
  line of `…` alone for any lines. JSON log lines on stderr are not part of a transcript.
- `<!-- not run: why -->` on the line right before a shell block's fence keeps it from being
  run; the reason is required. Any other fence (text, an output, a tree) is not shell, and
  may hold no `$ ` transcript.

Each block runs in a bash of its own, one command at a time, in a temporary directory that
looks like the clone (its `.venv`, `examples/`, `config/`, `deploy/`), with the venv's bin first
on PATH. Where a block needs a running sidecar (its curl requests, `-c sidecar.toml`), SPECS
says so: the test starts the real `run` (conftest's SidecarProcess) on a free port, toward the
fake TimeBack, configured in `sidecar.toml` beside the block, and creates what the prose says
is there (dead letters, an archive, files). Documented addresses and placeholders are swapped
for the live ones (pairs_for, and each spec's `pairs`): `localhost:8787` is the live sidecar,
`/etc/caliper-sidecar/` the block's directory. Between two commands the test waits until the
live sidecar has nothing waiting (but where the prose keeps an event waiting), as a person
reads one answer before typing the next."""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.delivery.archive import Archive, ArchivedEvent
from caliper_sidecar.outbox import NewEvent, sqlite_outbox
from caliper_sidecar.outbox.sqlite.storage import PAGE_SIZE
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import (
    SidecarProcess,
    eventually,
    free_port,
    make_event,
    new_id,
    write_config,
)
from .destinations import DISTRICT_TOKEN, start_district

# The chart's helm: fetched once into .cache/helm, skipped where it cannot be had (a failure
# under CALIPER_SIDECAR_REQUIRE_HELM=1, as in CI). Used by name, through getfixturevalue.
from .test_helm import helm  # noqa: F401

ROOT: Final = Path(__file__).resolve().parents[1]
PAGES: Final = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS: Final = ("sh", "bash", "shell", "console")
FENCE: Final = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
NOT_RUN: Final = re.compile(r"^[ \t]*<!-- not run: (?P<why>.*?) -->[ \t]*$")
#: The sender token the live sidecars take (a tokens file's line, where a spec asks for one).
TOKEN: Final = "docs-sender-token-0123456789abcdef"
#: bash, before a block: a pipeline fails when any part does, and a documented request that
#: gets an error status fails as a command does (curl alone exits 0 on a 415).
PREAMBLE: Final = 'set -o pipefail\ncurl() { command curl --fail-with-body "$@"; }'
#: A documented command that starts a server, with the port it listens on by default.
SERVERS: Final = {"run": 8787, "mock-upstream": 8788}


# -- the blocks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    text: str  # as documented, continuation lines kept
    shown: tuple[str, ...] | None  # what a transcript shows it print; None: not shown (sh)


@dataclass(frozen=True)
class Block:
    page: str  # relative to the clone
    line: int  # of the opening fence
    lang: str
    body: str  # its lines, the fence's indentation taken off
    not_run: str | None  # the marker's reason, when it has one

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def commands(self) -> list[Command]:
        lines = self.body.splitlines()
        found: list[Command] = []
        if self.lang == "console":
            text, shown = "", list[str]()
            for line in lines:
                if line.startswith("$ ") and not text.endswith("\\"):
                    if text:
                        found.append(Command(text, tuple(shown)))
                    text, shown = line[2:], []
                elif text.endswith("\\"):
                    text += "\n" + line
                else:
                    shown.append(line)
            if text:
                found.append(Command(text, tuple(shown)))
            return found
        text = ""
        for line in lines:
            text = f"{text}\n{line}" if text else line
            if not text.endswith("\\"):
                if text.strip() and not text.lstrip().startswith("#"):
                    found.append(Command(text, None))
                text = ""
        return found


def fenced(page: Path) -> list[Block]:
    """Every fenced block of a page, indented ones (in a list item) too."""
    text = page.read_text()
    lines = text.splitlines()
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        marker = NOT_RUN.match(lines[line - 2]) if line > 1 else None
        indent = len(m["indent"])
        body = "".join(row[indent:] for row in m["body"].splitlines(keepends=True))
        found.append(
            Block(str(page.relative_to(ROOT)), line, m["lang"], body, marker and marker["why"])
        )
    return found


BLOCKS: Final = [block for page in PAGES for block in fenced(page)]
RUN: Final = [b for b in BLOCKS if b.lang in SHELLS and b.not_run is None]


# -- the conventions ------------------------------------------------------------------------


def test_every_shell_block_is_run_or_says_why_not() -> None:
    """Markers have a reason and sit right before a shell block; transcripts are fenced as
    console, and commands to run as sh; nothing that looks like a command hides elsewhere."""
    wrong = []
    for page in PAGES:
        markers = sum(1 for line in page.read_text().splitlines() if NOT_RUN.match(line))
        attached = sum(
            1 for b in BLOCKS if b.page == str(page.relative_to(ROOT)) and b.not_run is not None
        )
        if markers != attached:
            wrong.append(f"{page.name}: a `<!-- not run: … -->` not right before a fence")
    for block in BLOCKS:
        prompts = any(line.startswith("$ ") for line in block.body.splitlines())
        if block.not_run is not None and block.lang not in SHELLS:
            wrong.append(f"{block.where}: a not-run marker on a ```{block.lang} block")
        if block.not_run is not None and len(block.not_run.split()) < 3:
            wrong.append(f"{block.where}: say why it is not run")
        if block.lang == "console" and not block.body.startswith("$ "):
            wrong.append(f"{block.where}: a console block starts with `$ `")
        if prompts and block.lang != "console":
            wrong.append(f"{block.where}: a transcript in ```{block.lang}: fence it as console")
    assert wrong == []


def test_every_spec_names_one_block() -> None:
    """A spec whose block changed or went away fails here, not silently."""
    for spec in SPECS:
        named = [b.where for b in RUN if b.page == spec.page and spec.text in b.body]
        assert len(named) == 1, f"{spec.page}: {spec.text!r} names {named}"


def test_shown_output_is_matched_line_by_line() -> None:
    """The matcher refuses output that differs, and `…` stands for what varies."""
    assert matches(("read 6 events", "…", "exit 0"), ["read 6 events", "a", "b", "exit 0"])
    assert matches(("queued … again: upstream 6",), ["queued 6 events again: upstream 6"])
    assert not matches(("exit 0",), ["exit 1"])
    assert not matches(("checked  100",), ["checked  100", "held  93"])


# -- a live sidecar and the bash a block runs in ---------------------------------------------

Pairs = Sequence[tuple["str | re.Pattern[str]", str]]


@dataclass
class Live:
    """What one block runs against: its directory, the documented ports' live ones, the fake
    TimeBack, and the sidecar and the district's endpoint when its spec starts them."""

    dir: Path
    platform: RunningFake
    processes: list[SidecarProcess]  # conftest's: killed at the test's end, if still running
    ports: dict[int, int] = field(default_factory=dict)
    district: RunningFake | None = None
    run: SidecarProcess | None = None
    #: what a spec's `given` found for its `pairs` (the id of a dead letter)
    found: dict[str, str] = field(default_factory=dict)

    def port(self, documented: int) -> int:
        if documented not in self.ports:
            self.ports[documented] = free_port()
        return self.ports[documented]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port(8787)}"

    @property
    def fake_address(self) -> str:
        return self.platform.base_url.removeprefix("http://")


class Session:
    """One bash for one block, given a command at a time as a reader types them: exports
    carry over; each command's exit status and output (stdout and stderr, as a terminal shows
    them) are read apart; its stdin is /dev/null."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.mark = f"@@{secrets.token_hex(8)}@@"
        self.proc: asyncio.subprocess.Process | None = None
        self.servers: list[tuple[int, Path]] = []

    async def __aenter__(self) -> Session:
        self.proc = await asyncio.create_subprocess_exec(
            "bash",
            "--noprofile",
            "--norc",
            cwd=self.directory,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        status, output = await self.run(PREAMBLE)
        assert status == 0, output
        return self

    async def __aexit__(self, *_: object) -> None:
        """Ends bash, and kills what a failed block left running (a passing one stopped its
        servers itself, and checked how they ended)."""
        assert self.proc is not None
        for pid, _log in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    async def _write(self, script: str) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(script.encode())
        await self.proc.stdin.drain()

    async def _until_mark(self, command: str, timeout: float) -> tuple[int, str]:
        assert self.proc is not None
        assert self.proc.stdout is not None
        out = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = await asyncio.wait_for(
                    self.proc.stdout.readline(), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                said = out.decode(errors="replace")
                raise AssertionError(
                    f"`{command}` still running after {timeout} s: {said}"
                ) from None
            if not line:
                raise AssertionError(f"bash ended during `{command}`: {out.decode()}")
            if line.startswith(self.mark.encode()):
                text = out.decode(errors="replace")
                # printf put a newline before the mark, for output that ends without one
                return int(line.split()[-1]), text[:-1] if text.endswith("\n") else text
            out += line

    async def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run one command to its end: its exit status and what it printed."""
        await self._write(f"{{\n{command}\n}} </dev/null 2>&1\nprintf '\\n{self.mark} %d\\n' $?\n")
        return await self._until_mark(command, timeout)

    async def start(self, command: str, log: Path) -> None:
        """Start a server in the background, its output in `log` (a subshell that execs it:
        $! is the server itself, which stop_servers ends with SIGTERM)."""
        await self._write(
            f"(\n{command}\n) </dev/null >{shlex.quote(str(log))} 2>&1 &\n"
            f"printf '\\n{self.mark} %d\\n' $!\n"
        )
        pid, _ = await self._until_mark(command, 10)
        self.servers.append((pid, log))

    async def stop_servers(self) -> list[str]:
        """Stop what the block started; what did not exit 0, or logged a warning."""
        wrong = []
        for pid, log in self.servers:
            status, _ = await self.run(f"kill -TERM {pid}; wait {pid}")
            said = logged(log)
            if status != 0:
                wrong.append(f"{log.name} exited {status}: {said}")
            for line in said.splitlines():
                # The tests run as root on these machines, which `run` rightly warns of.
                as_root = os.geteuid() == 0 and "running as root" in line
                if log_level(line) in ("warning", "error", "critical") and not as_root:
                    wrong.append(f"{log.name}: {line}")
        self.servers = []
        return wrong


def logged(log: Path) -> str:
    return log.read_text(errors="replace")


def log_level(line: str) -> str | None:
    """The level of a JSON log line (or a console one's), None for any other line."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if isinstance(record, dict) and "event" in record:
            return str(record.get("level"))
        return None
    found = re.search(r"\[(debug|info|warning|error|critical)\s*\]", line)
    return found[1] if found else None


def matches(shown: Sequence[str], printed: Sequence[str]) -> bool:
    """What a transcript shows against what the command printed: every line, in order,
    `…` standing for any text in a line, and for any lines on a line of its own."""
    pattern = "".join(
        r"(?:[^\n]*\n)*" if line.strip() == "…" else re.escape(line).replace("…", "[^\n]*") + "\n"
        for line in shown
    )
    return re.fullmatch(pattern, "".join(f"{line}\n" for line in printed)) is not None


def trimmed(lines: Sequence[str]) -> list[str]:
    kept = [line.rstrip() for line in lines]
    while kept and not kept[-1]:
        kept.pop()
    return kept


# -- what each block needs around it ----------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What one documented block needs: `text` names it (a piece of it, on its page)."""

    page: str
    text: str
    #: write_config's keys for a live sidecar; None starts none
    sidecar: Callable[[Live], dict[str, Any]] | None = None
    #: more of its sidecar.toml ([[destinations]])
    toml: Callable[[Live], str] | None = None
    #: a district's Caliper endpoint beside the fake TimeBack
    district: bool = False
    #: what the prose says is there before the sidecar starts (files) ...
    prepare: Callable[[Live], Awaitable[None]] | None = None
    #: ... and once it runs (events delivered, dead letters)
    given: Callable[[Live], Awaitable[None]] | None = None
    #: documented text -> live text, in the commands
    pairs: Callable[[Live], Pairs] | None = None
    #: live text (or a pattern) -> documented text, in what they print
    shown: Callable[[Live], Pairs] | None = None
    #: what the block promised, checked after it (the session still open)
    after: Callable[[Live, Session], Awaitable[None]] | None = None
    #: wait for the live sidecar to have nothing waiting between commands (not where the
    #: prose keeps an event waiting on purpose)
    settle: bool = True
    #: helm on PATH (test_helm's, the version the chart was written against)
    helm: bool = False


async def post(url: str, events: Any) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/events", json=events) as resp:
        assert resp.status == 202, await resp.text()


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def settled(live: Live) -> bool:
    """Nothing waits at any destination, nothing is in flight."""
    status = await get_json(f"{live.url}/v1/status")
    return bool(
        status["upstream"]["in_flight"] == 0
        and all(d["waiting"] == 0 for d in status["destinations"])
    )


async def journey_is(live: Live, event_id: str, state: str, archive: str | None = None) -> bool:
    journey = await get_json(f"{live.url}/v1/events/{event_id}")
    there = journey["destinations"].get(archive, {}).get("state") if archive else "delivered"
    return bool(journey["state"] == state and there == "delivered")


def tokens_file(live: Live) -> dict[str, Any]:
    """A sidecar that takes TOKEN from a tokens file where the docs keep theirs."""
    path = live.dir / "tokens"
    path.write_text(f"app-a {TOKEN}\n")
    path.chmod(0o600)
    return {"receiver__tokens_file": str(path)}


async def sent_by_hand(live: Live, session: Session) -> None:
    """The README's by-hand run: the event reached the fake it started."""
    url = f"http://127.0.0.1:{live.port(8788)}/_mock/events?ids=false"

    async def arrived() -> bool:
        return bool((await get_json(url))["count"] == 1)

    await eventually(arrived, 20)


async def new_token_works(live: Live, session: Session) -> None:
    """The line `token new` appended (owner-only file) is a sender token once SIGHUP read it."""
    path = live.dir / "tokens"
    assert path.stat().st_mode & 0o777 == 0o600
    label, token = path.read_text().splitlines()[-1].split()
    assert label == "room-12"

    async def accepted() -> bool:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{live.url}/v1/events",
                json=make_event(),
                headers={"Authorization": f"Bearer {token}"},
            ) as resp,
        ):
            return resp.status == 202

    await eventually(accepted, 20)


async def the_sdk_gets_in(live: Live, session: Session) -> None:
    """What TimeBack's SDK does with those variables works: a token from the auth URL for
    the client id and secret (client_secret_basic, as the SDK sends them), then an envelope
    to the base URL's /caliper/event, answered 200."""
    _, out = await session.run(
        'printf "%s\\n" "$TIMEBACK_API_BASE_URL" "$TIMEBACK_API_AUTH_URL" '
        '"$TIMEBACK_API_CLIENT_ID" "$TIMEBACK_API_CLIENT_SECRET"'
    )
    base, auth, client_id, secret = out.splitlines()
    async with aiohttp.ClientSession() as http:
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        async with http.post(
            auth,
            data={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {basic}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            access = (await resp.json())["access_token"]
        envelope = json.loads((ROOT / "examples" / "envelope.json").read_text())
        async with http.post(
            f"{base}/caliper/event", json=envelope, headers={"Authorization": f"Bearer {access}"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["status"] == "success"


async def event_files(live: Live) -> None:
    """The app's event, and two as JSON Lines."""
    shutil.copy(ROOT / "examples" / "event.json", live.dir / "event.json")
    lines = "".join(json.dumps(make_event()) + "\n" for _ in range(2))
    (live.dir / "events.jsonl").write_text(lines)


async def event_files_delivered(live: Live, session: Session) -> None:
    ids = {json.loads((live.dir / "event.json").read_text())["id"]}
    lines = (live.dir / "events.jsonl").read_text().splitlines()
    ids |= {json.loads(line)["id"] for line in lines}
    await live.platform.fake.wait_for(ids, 20)


async def lesson(live: Live) -> None:
    """Two items, the second's eventTime not UTC as Caliper writes it."""
    good = json.loads((ROOT / "examples" / "event.json").read_text())
    bad = {**good, "id": "urn:uuid:5f0e2b0e-6f7a-4c55-9b38-0f3f1c9b5a11"}
    bad["eventTime"] = "2024-01-15 10:07:30"
    (live.dir / "lesson.json").write_text(json.dumps([good, bad], indent=2))


async def an_outbox_of_4k_pages(live: Live) -> None:
    """An outbox as an earlier release created it (4 KB pages), holding five waiting events."""
    path = live.dir / "data" / "outbox.db"
    path.parent.mkdir()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    async with sqlite_outbox(OutboxSettings(path=str(path))) as outbox:
        await outbox.append(
            [NewEvent(new_id(), json.dumps(make_event()).encode()) for _ in range(5)]
        )


async def converted_to_1k_pages(live: Live, session: Session) -> None:
    path = live.dir / "data" / "outbox.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (PAGE_SIZE,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    async with sqlite_outbox(OutboxSettings(path=str(path))) as outbox:
        assert (await outbox.stats()).events == 5


async def three_hours_archived(live: Live) -> None:
    """The archive's three hour files of 2026-03-14 (09: three events, 10: two, 11: one),
    written by the archive itself."""
    base = calendar.timegm((2026, 3, 14, 9, 0, 0))
    actions = ["Started", "Completed", "Paused", "Completed", "Started", "Started"]
    minutes = [0, 25, 50, 75, 100, 125]
    events = []
    for n, (action, minute) in enumerate(zip(actions, minutes, strict=True)):
        at = base + minute * 60
        body = {
            "id": f"urn:uuid:{n:08d}-0000-4000-8000-000000000000",
            "type": "AssessmentEvent",
            "action": action,
            "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(at)),
            "actor": {"id": f"https://example.edu/users/{n % 2}"},
        }
        events.append(ArchivedEvent(at, json.dumps(body, separators=(",", ":")).encode()))
    async with Archive(live.dir / "archive", keep_days=0) as archive:
        await archive.append(events)


async def two_learners_archived_then_wiped(live: Live) -> None:
    """Six events of two learners (an hour old) delivered and archived; then the fake
    forgets them all (`POST /_mock/wipe`)."""
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    learners = ["https://school.example/users/ana", "https://school.example/users/ben"]
    events = [
        make_event(actor={"id": learner, "type": "Person"}, eventTime=hour_ago)
        for learner in learners
        for _ in range(3)
    ]
    await post(live.url, events)
    await live.platform.fake.wait_for({e["id"] for e in events}, 20)
    await eventually(lambda: settled(live), 20)
    live.platform.fake.wipe()


LEARNER: Final = "https://sis.example.edu/users/4417"


async def learner_delivered_dead_and_waiting(live: Live) -> None:
    """Events of the learner: one delivered, one the platform refused (a dead letter), one
    waiting (the platform down); each archived."""
    # One hour file holds them: not in the last seconds of an hour.
    await eventually(lambda: time.time() % 3600 < 3600 - 15, 20)
    fake = live.platform.fake
    delivered, refused, waiting = (
        make_event(actor={"id": LEARNER, "type": "Person"}) for _ in range(3)
    )
    fake.faults.refuse_ids = {refused["id"]}
    await post(live.url, [delivered, refused])
    await eventually(lambda: journey_is(live, delivered["id"], "delivered", "archive"), 20)
    await eventually(lambda: journey_is(live, refused["id"], "dead_lettered", "archive"), 20)
    fake.faults.outage_until = time.monotonic() + 3600
    await post(live.url, [waiting])
    await eventually(lambda: journey_is(live, waiting["id"], "waiting", "archive"), 20)
    live.found.update(delivered=delivered["id"], refused=refused["id"], waiting=waiting["id"])


async def learner_gone(live: Live, session: Session) -> None:
    """The outbox knows none of the learner's events any more."""
    async with aiohttp.ClientSession() as http:
        for which in ("delivered", "refused", "waiting"):
            async with http.get(f"{live.url}/v1/events/{live.found[which]}") as resp:
                assert resp.status == 404, (which, await resp.text())


async def dead_letter_each(live: Live) -> None:
    """One event the district refuses, one the platform refuses (`dead_upstream`)."""
    assert live.district is not None
    for_district, for_upstream = make_event(), make_event()
    live.district.fake.faults.refuse_ids = {for_district["id"]}
    live.platform.fake.faults.refuse_ids = {for_upstream["id"]}
    live.found["dead letter"] = for_upstream["id"]
    live.found["district's"] = for_district["id"]
    await post(live.url, [for_district, for_upstream, make_event()])

    async def both() -> bool:
        letters = (await get_json(f"{live.url}/v1/dead-letters"))["dead_letters"]
        return len(letters) == 2

    await eventually(both, 20)
    live.district.fake.faults.refuse_ids = set()  # the cause fixed, as the prose has it


async def district_replayed_upstream_purged(live: Live, session: Session) -> None:
    """The district's dead letter reached it; the purged one went nowhere; none are left."""
    assert live.district is not None
    await live.district.fake.wait_for({live.found["district's"]}, 20)
    assert live.found["dead letter"] not in live.platform.fake.received
    assert (await get_json(f"{live.url}/v1/dead-letters"))["dead_letters"] == []


async def a_dead_letter(live: Live) -> None:
    """One event the platform refused."""
    refused = make_event()
    live.platform.fake.faults.refuse_ids = {refused["id"]}
    live.found["dead letter"] = refused["id"]
    await post(live.url, [refused])
    await eventually(lambda: journey_is(live, refused["id"], "dead_lettered"), 20)
    live.platform.fake.faults.refuse_ids = set()  # the cause fixed, as the prose has it


async def replayed_and_delivered(live: Live, session: Session) -> None:
    await live.platform.fake.wait_for({live.found["dead letter"]}, 20)
    assert (await get_json(f"{live.url}/v1/dead-letters"))["dead_letters"] == []


def dead_upstream(live: Live) -> Pairs:
    """The docs' placeholder id is that dead letter's."""
    return [("urn:uuid:…", live.found["dead letter"])]


def beyond_ai(live: Live) -> dict[str, Any]:
    """Toward the fake Beyond AI, which lists what it holds; events kept for a day's check."""
    return {
        "upstream__endpoint": live.platform.beyond_url,
        "upstream__platform": "beyond-ai",
        "reconcile__after_s": 86400,
    }


async def delivered(live: Live, count: int) -> None:
    await post(live.url, [make_event() for _ in range(count)])
    fake = live.platform.fake
    await eventually(lambda: len(fake.received) + len(fake.lost) == count, 20)
    await eventually(lambda: settled(live), 20)


async def ten_delivered(live: Live) -> None:
    await delivered(live, 10)


async def hundred_delivered_a_tenth_lost(live: Live) -> None:
    """`mock-upstream --lose-rate 0.1` (its draws seeded: 7 of the first 100 lost)."""
    live.platform.fake.faults.lose_rate = 0.1
    await delivered(live, 100)


def defaults(live: Live) -> dict[str, Any]:
    """A sidecar as write_config makes it, toward the fake TimeBack."""
    return {}


def the_live_pid(live: Live) -> Pairs:
    """No systemd here, and the machine runs other sidecars (other tests', other people's):
    the unit's reload (ExecReload=/bin/kill -HUP $MAINPID) sent to the live one, found by
    its outbox's lock note, as the README says to without systemd."""
    assert live.run is not None
    note = Path(f"{os.path.realpath(live.dir / 'outbox.db')}.lock")
    assert note.read_text() == str(live.run.proc.pid)
    return [("systemctl reload caliper-sidecar", f'kill -HUP "$(cat {note})"')]


def district_lrs(live: Live) -> str:
    """The district's endpoint as `district-lrs`, with its static token."""
    assert live.district is not None
    return (
        '\n[[destinations]]\nname = "district-lrs"\nkind = "caliper"\n'
        f'endpoint = "{live.district.events_url}"\nbearer_token = "{DISTRICT_TOKEN}"\n'
        "linger_ms = 20\ntimeout_s = 5\n"
    )


def archive(live: Live) -> str:
    """An archive beside the configuration."""
    return '\n[[destinations]]\nname = "archive"\nkind = "archive"\ndir = "archive"\n'


SPECS: Final = [
    Spec(
        "README.md",
        "caliper-sidecar mock-upstream",
        pairs=lambda live: [
            ("127.0.0.1:8788", f"127.0.0.1:{live.port(8788)}"),
            (
                "caliper-sidecar mock-upstream",
                f"caliper-sidecar mock-upstream --port {live.port(8788)}",
            ),
        ],
        after=sent_by_hand,
    ),
    Spec(
        "README.md",
        "token new --label room-12 --append",
        sidecar=tokens_file,
        pairs=the_live_pid,
        after=new_token_works,
    ),
    Spec(
        "docs/app-developers.md",
        "TIMEBACK_API_BASE_URL",
        sidecar=tokens_file,
        pairs=lambda live: [("<a sender token>", TOKEN)],
        after=the_sdk_gets_in,
    ),
    Spec(
        "docs/app-developers.md",
        "@events.jsonl",
        sidecar=defaults,
        prepare=event_files,
        after=event_files_delivered,
    ),
    Spec("docs/app-developers.md", "validate lesson.json", prepare=lesson),
    Spec("docs/archive.md", "$ gzip -dc", prepare=three_hours_archived),
    Spec(
        "docs/archive.md",
        "$ caliper-sidecar replay --since 2h -c",
        sidecar=defaults,
        toml=archive,
        given=two_learners_archived_then_wiped,
        pairs=lambda live: [("127.0.0.1:18788", live.fake_address)],
        shown=lambda live: [(str(live.dir), "/tmp/replaydemo")],
    ),
    Spec(
        "docs/destinations.md",
        "dead-letters replay -c sidecar.toml --destination district-lrs",
        sidecar=defaults,
        district=True,
        toml=district_lrs,
        given=dead_letter_each,
        pairs=dead_upstream,
        after=district_replayed_upstream_purged,
    ),
    Spec(
        "docs/guarantees.md",
        "dead-letters replay -c sidecar.toml urn:uuid:…",
        sidecar=defaults,
        given=a_dead_letter,
        pairs=dead_upstream,
        after=replayed_and_delivered,
    ),
    Spec(
        "docs/operators.md",
        f"erase --actor {LEARNER} --dry-run",
        sidecar=defaults,
        toml=archive,
        given=learner_delivered_dead_and_waiting,
        after=learner_gone,
        settle=False,
    ),
    Spec(
        "docs/operators.md",
        "$ caliper-sidecar erase",
        sidecar=defaults,
        toml=archive,
        given=learner_delivered_dead_and_waiting,
        shown=lambda live: [
            (re.compile(r"\d{4}/\d\d/\d\d/\d\d\.ndjson\.gz"), "2026/12/06/00.ndjson.gz")
        ],
        settle=False,
    ),
    Spec(
        "docs/operators.md",
        "PRAGMA page_size = 1024",
        prepare=an_outbox_of_4k_pages,
        after=converted_to_1k_pages,
    ),
    Spec("docs/operators.md", "$ helm lint --strict", helm=True),
    Spec("docs/operators.md", "client_secret=s3cret", helm=True),
    Spec(
        "docs/reconcile.md",
        "reconcile --since 2026-12-01T00:00:00Z",
        sidecar=beyond_ai,
        given=ten_delivered,
    ),
    Spec(
        "docs/reconcile.md",
        "$ caliper-sidecar reconcile --dry-run",
        sidecar=beyond_ai,
        given=hundred_delivered_a_tenth_lost,
        shown=lambda live: [(live.fake_address, "127.0.0.1:8798")],
    ),
]


def spec_of(block: Block) -> Spec:
    for spec in SPECS:
        if spec.page == block.page and spec.text in block.body:
            return spec
    return Spec(block.page, "")


#: For every block: `localhost:8787` is the live sidecar, /etc/caliper-sidecar/ its directory.
def pairs_for(live: Live) -> list[tuple[str | re.Pattern[str], str]]:
    return [
        ("localhost:8787", f"127.0.0.1:{live.port(8787)}"),
        ("127.0.0.1:8787", f"127.0.0.1:{live.port(8787)}"),
        ("/etc/caliper-sidecar/", f"{live.dir}/"),
    ]


def swap(text: str, pairs: Pairs) -> str:
    for old, new in pairs:
        text = old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new)
    return text


def server(command: str) -> int | None:
    """The documented port of a server the command starts (`run`, `mock-upstream`)."""
    try:
        words = shlex.split(command.replace("\\\n", " "), comments=True)
    except ValueError:
        return None
    while words and re.match(r"^\w+=", words[0]):
        words = words[1:]  # VARIABLE=value before the command
    if len(words) >= 2 and words[0].endswith("caliper-sidecar"):
        return SERVERS.get(words[1])
    return None


async def wait_listening(port: int, log: Path) -> None:
    async def listening() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    try:
        await eventually(listening, 20)
    except AssertionError:
        raise AssertionError(f"nothing listens on {port}: {logged(log)}") from None


# -- running them -----------------------------------------------------------------------------


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.where)
async def test_a_documented_block_runs(
    block: Block,
    tmp_path: Path,
    platform: RunningFake,
    processes: list[SidecarProcess],
    request: pytest.FixtureRequest,
) -> None:
    spec = spec_of(block)
    live = Live(tmp_path, platform, processes)
    # The clone as a reader has it: its venv, its examples, its configuration and deploy/.
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    for name in ("examples", "config", "deploy"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    if spec.helm:
        (bin_dir / "helm").symlink_to(request.getfixturevalue("helm"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]])
    env["PYTHONUNBUFFERED"] = "1"  # stdout and stderr in the order a terminal shows them

    async with contextlib.AsyncExitStack() as closing:
        await run_block(block, spec, live, env, closing)


async def run_block(
    block: Block, spec: Spec, live: Live, env: dict[str, str], closing: contextlib.AsyncExitStack
) -> None:
    if spec.prepare is not None:
        await spec.prepare(live)
    if spec.sidecar is not None:
        if spec.district:
            live.district = await start_district()
            closing.push_async_callback(live.district.close)
        config = write_config(
            live.dir / "sidecar.toml",
            live.platform,
            live.dir / "outbox.db",
            live.port(8787),
            **spec.sidecar(live),
        )
        config.write_text(config.read_text() + (spec.toml(live) if spec.toml else ""))
        live.run = SidecarProcess(config, live.port(8787), live.dir / "run.log")
        live.processes.append(live.run)
        await live.run.wait_ready()
    if spec.given is not None:
        await spec.given(live)

    to_live = [*pairs_for(live), *(spec.pairs(live) if spec.pairs else [])]
    to_doc = spec.shown(live) if spec.shown else []
    async with Session(live.dir, env) as session:
        for n, command in enumerate(block.commands()):
            text = swap(command.text, to_live)
            port = server(text)
            if port is not None:
                if port == 8787:
                    text = f"SIDECAR_RECEIVER_PORT={live.port(8787)} {text}"
                await session.start(text, live.dir / f"server-{n}.log")
                await wait_listening(live.port(port), live.dir / f"server-{n}.log")
                continue
            status, output = await session.run(text)
            printed = trimmed(
                [swap(line, to_doc) for line in output.splitlines() if log_level(line) is None]
            )
            said = f"{block.where}: `{text}` exited {status}:\n{output}"
            assert status == 0, said
            if command.shown is not None:
                shown = trimmed(command.shown)
                assert matches(shown, printed), (
                    f"{block.where}: `{text}` printed\n"
                    + "\n".join(printed)
                    + "\n\nwhere the docs show\n"
                    + "\n".join(shown)
                )
            if live.run is not None and spec.settle:
                await eventually(lambda: settled(live), 20)
        if spec.after is not None:
            await spec.after(live, session)
        assert await session.stop_servers() == []
    if live.run is not None:
        assert await live.run.terminate() == 0
