"""The `caliper-sidecar` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caliper_sidecar import __version__
from caliper_sidecar.cli_times import MOMENT_HELP, parse_moment
from caliper_sidecar.config import (
    SENDER_LABEL_RULE,
    UPSTREAM,
    Origins,
    Settings,
    is_sender_label,
    load_settings,
    redacted,
    render_toml,
    tokens_of,
)
from caliper_sidecar.exceptions import ConfigError, OutboxUnavailable, SidecarError
from caliper_sidecar.ids import canonical_id
from caliper_sidecar.logs import configure_logging
from caliper_sidecar.preflight import preflight, reconcile_unavailable
from caliper_sidecar.presets import PROFILES

if TYPE_CHECKING:
    from caliper_sidecar.delivery.archive_erase import ArchiveErasure
    from caliper_sidecar.outbox import DestinationStats, Erasure, Journey, Outbox


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except SidecarError as e:
        print(f"caliper-sidecar: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


CONFIG_HELP = (
    "the TOML configuration (default: the file named by $SIDECAR_CONFIG, else built-in "
    "defaults); any key can also be set as SIDECAR_<SECTION>_<KEY>"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="caliper-sidecar",
        description="A durable local outbox that forwards IMS Caliper 1.2 events to TimeBack.",
        epilog="Run `caliper-sidecar COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"caliper-sidecar {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    def command(
        parent: Any, name: str, help: str, handler: Any, config: bool = True
    ) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        if config:
            c.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
        c.set_defaults(handler=handler)
        return c

    def group(name: str, help: str) -> Any:
        """A command made of actions; without one it prints its own help."""
        g = sub.add_parser(name, help=help, description=help)
        g.set_defaults(handler=lambda _: _help_of(g))
        return g.add_subparsers(metavar="ACTION")

    command(sub, "run", "receive events and forward them until SIGTERM/SIGINT", _run)
    command(
        sub,
        "demo",
        "run a sidecar against a built-in fake TimeBack, no config needed",
        _demo,
        config=False,
    )
    m = command(
        sub,
        "mock-upstream",
        "serve a fake TimeBack (both platforms' Caliper endpoints, jobs, tokens) for "
        "developing an app offline",
        _mock_upstream,
        config=False,
    )
    m.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    m.add_argument("--port", type=int, default=8788, help="port (default: %(default)s)")
    m.add_argument(
        "--client-id", default="sidecar", help="the OAuth client it accepts (%(default)s)"
    )
    m.add_argument(
        "--client-secret", default="sidecar-secret", help="that client's secret (%(default)s)"
    )
    m.add_argument(
        "--token-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="lifetime of the tokens it issues (default: %(default)s)",
    )
    m.add_argument("--latency-ms", type=float, default=0.0, help="delay before each Caliper answer")
    m.add_argument(
        "--ids-only",
        action="store_true",
        help="remember only the ids of received events (for large benchmarks)",
    )
    m.add_argument(
        "--lose-rate",
        type=float,
        default=0.0,
        help="share of events answered as taken and then silently lost, each at its first "
        "arrival (0..1): what reconciliation finds",
    )
    m.add_argument(
        "--chaos-rate",
        type=float,
        default=0.0,
        help="probability of a random fault per request (0..1)",
    )
    v = command(sub, "validate", "validate events or envelopes offline", _validate, config=False)
    v.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="JSON files: an event, an array, an envelope, or JSON Lines (default: stdin)",
    )
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.add_argument(
        "--profile",
        choices=PROFILES,
        default="timeback",
        help="timeback: what TimeBack's platforms accept, the SDK's profile included "
        "(default); timeback-learnwith: plus LearnWith.AI's identity rules; caliper: 1.2 only",
    )
    command(
        sub,
        "check-config",
        "print the effective configuration, secrets redacted, each value's origin; exit 2 "
        "when it is wrong",
        _check_config,
    )

    tokens = group("token", "sender tokens for apps and devices")
    new = command(
        tokens,
        "new",
        "print a new random sender token, or add it to a tokens file (--append)",
        _token_new,
        config=False,
    )
    new.add_argument(
        "--label",
        help="who the token is for (a room, an app): written before it in the file; "
        f"{SENDER_LABEL_RULE}",
    )
    new.add_argument(
        "--append",
        metavar="FILE",
        help="add the line to this tokens file (created if missing): on a line of its own, "
        "written atomically, owner-only (0600); then only the token is printed",
    )

    outbox = group("outbox", "inspect the outbox (safe while `run` is running)")
    stats = command(outbox, "stats", "counts of waiting, delivered and dead events", None)
    stats.add_argument("--json", action="store_true", help="JSON instead of lines for people")
    stats.set_defaults(handler=_outbox_stats)

    r = command(
        sub,
        "replay",
        "queue the events an archive destination kept again, ids unchanged, for the named "
        "destinations (by eventTime; optionally one actor's); safe while `run` runs",
        _replay,
    )
    r.add_argument(
        "--since",
        required=True,
        metavar="T",
        help=f"events whose eventTime is at or after T: {MOMENT_HELP}",
    )
    r.add_argument("--until", metavar="T", help="… and before T (default: no bound)")
    r.add_argument(
        "--actor", metavar="ID", help="only this actor's events (the `actor` string or `actor.id`)"
    )
    r.add_argument(
        "--to",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="the destinations to send them to (`--to a b`, or `--to a --to b`): upstream "
        "([upstream]), [[destinations]] names (default: every destination that is not an "
        "archive)",
    )
    r.add_argument(
        "--from",
        dest="source",
        metavar="NAME",
        help="the archive destination to read (needed when there are several)",
    )

    rec = command(
        sub,
        "reconcile",
        "check the events delivered upstream against what the platform holds (Beyond AI), "
        "and send the missing ones again (safe while `run` is running)",
        _reconcile,
    )
    rec.add_argument("--since", metavar="T", help=f"events from this eventTime on: {MOMENT_HELP}")
    rec.add_argument("--until", metavar="T", help="events before this eventTime")
    rec.add_argument(
        "--dry-run",
        action="store_true",
        help="only report: nothing recorded or sent again; exit 1 when any is missing",
    )

    t = command(
        sub,
        "tail",
        "follow what happens to events in the running sidecar: accepted, sent, confirmed, "
        "dead-lettered, per destination, with sender labels and ids (never their content)",
        _tail,
    )
    t.add_argument("--json", action="store_true", help="one JSON object a line, as served")

    dead = group("dead-letters", "list, replay or purge dead letters (safe while `run` runs)")
    listing = command(dead, "list", "show dead letters with their reasons", _dead_list)
    listing.add_argument(
        "--limit", type=int, default=100, help="show at most this many (default: %(default)s)"
    )
    listing.add_argument("--after", metavar="ID", help="continue after this event id")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--destination", metavar="NAME", help=DESTINATION_HELP)
    for name, handler, what in (
        (
            "replay",
            _dead_replay,
            "put dead letters back in their destination's queue, to be sent again",
        ),
        ("purge", _dead_purge, "delete dead letters for good"),
    ):
        a = command(dead, name, f"{what}: by id, or all of them", handler)
        which = a.add_mutually_exclusive_group(required=True)
        which.add_argument("ids", nargs="*", default=[], metavar="ID", help="event ids")
        which.add_argument(
            "--all",
            action="store_true",
            help="every dead letter (of --destination, when given)"
            + (" (WARNING: they are gone for good; list them first)" if name == "purge" else ""),
        )
        a.add_argument("--destination", metavar="NAME", help=DESTINATION_HELP)
    erase = command(
        sub,
        "erase",
        "remove every event of one learner (its actor) from the outbox, the dead letters and "
        "the archives (safe while `run` is running); exit 0 removed, 1 nothing matched, "
        "2 bad input, 3 removed but the outbox's files not yet rewritten",
        _erase,
    )
    erase.add_argument(
        "--actor",
        required=True,
        metavar="ID",
        help="the learner: an event's `actor` when it is a string, else its `actor.id`",
    )
    erase.add_argument(
        "--dry-run", action="store_true", help="print what would be removed; change nothing"
    )
    return p


DESTINATION_HELP = (
    "only the dead letters of this destination: upstream ([upstream]), or a [[destinations]] "
    "name (default: every destination's)"
)


def _help_of(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _settings(args: argparse.Namespace, origins: Origins | None = None) -> Settings:
    return load_settings(getattr(args, "config", None), origins=origins)


#: how long a thread holds the GIL while another waits for it, in `run`
SWITCH_INTERVAL_S = 0.00025
#: allocations between collections of the youngest generation in `run` (Python's default: 700)
GC_YOUNG_THRESHOLD = 50_000


def _run(args: argparse.Namespace) -> int:
    from caliper_sidecar.app import serve

    origins: Origins = {}
    settings = _settings(args, origins)
    configure_logging(settings.log.level, settings.log.format)
    # The outbox's writer thread needs the GIL back after each SQLite call of a group commit;
    # behind a busy event loop it waited up to the whole switch interval (5 ms by default)
    # each time, which stretched commits and so throughput under load (BENCHMARKS.md: about
    # +15 % at 0.25 ms, interleaved A/B).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    _collect_less()
    asyncio.run(serve(settings, origins, lambda: _settings(args)))
    return 0


def _collect_less() -> None:
    """The cyclic garbage collector, tuned for a server: what is loaded at start (modules,
    classes, the decoder's types) is never scanned again, and the young generation is
    collected every GC_YOUNG_THRESHOLD allocations instead of 700. Under single-event ingest
    it ran about 1,100 times in 10 s (3-4 % of the event loop's time, more in scans of
    everything loaded); interleaved A/B, +3 to +5 % requests/s, +0.3 MB peak memory (BENCHMARKS.md).
    Cycles are still collected, only in larger, rarer batches."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _demo(args: argparse.Namespace) -> int:
    from caliper_sidecar.tools.demo import run_demo

    return asyncio.run(run_demo())


def _mock_upstream(args: argparse.Namespace) -> int:
    from caliper_sidecar.tools.fake_timeback import FakeTimeBack, serve_fake

    fake = FakeTimeBack(
        args.client_id, args.client_secret, args.token_ttl, keep_events=not args.ids_only
    )
    fake.faults.latency_s = args.latency_ms / 1000
    fake.faults.chaos_rate = args.chaos_rate
    fake.faults.lose_rate = args.lose_rate
    configure_logging("info", "console")
    asyncio.run(serve_fake(fake, args.host, args.port))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from caliper_sidecar.tools.validate import validate_command

    return validate_command(args.files, as_json=args.json, profile=args.profile)


def _token_new(args: argparse.Namespace) -> int:
    import secrets

    label = args.label
    if label is not None and not is_sender_label(label):
        raise ConfigError(f"--label: one word of {SENDER_LABEL_RULE} (e.g. room-12)")
    token = secrets.token_urlsafe(24)  # 192 bits
    line = f"{label} {token}" if label else token
    if args.append is None:
        # The line for the tokens file on stdout; what to do with it beside.
        print(line)
        print(
            "a new sender token: add the line above to the file receiver.tokens_file names "
            "(`--append FILE` does it safely), and give the app the token (the part after the "
            "label)",
            file=sys.stderr,
        )
        return 0
    path, number = _append_line(Path(args.append), line)
    # The token once, alone (the app needs it; `$(…)` takes it); the rest for the operator.
    print(token)
    print(
        f"a new sender token{f' for {label}' if label else ''} is line {number} of {path}; "
        "give the app the token above, then reload the sidecar (`systemctl reload "
        "caliper-sidecar`, or SIGHUP)",
        file=sys.stderr,
    )
    return 0


def _append_line(path: Path, line: str) -> tuple[Path, int]:
    """Add `line` to the tokens file at `path` (created if missing) as a line of its own: a
    newline first where the last line lacks one (else the line would be glued onto a token).
    The whole file is written anew beside it, owner-only, fsynced, and renamed over it, so a
    sidecar reloading meanwhile reads the old file or the new one, never half of one. Returns
    the file written and the line's number. Refuses (ConfigError) to write a file the sidecar
    would refuse to load. Appends at once (a script making a token per room in parallel) take
    turns: each holds a lock on the file's directory from reading the file to renaming the
    new one over it, or the later rename would drop the earlier one's line."""
    target = path.resolve()  # through a symlink: the link keeps pointing at the file
    try:
        directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise SidecarError(f"--append: cannot open the directory of {path}: {e.strerror}") from None
    try:
        # The directory, not the file: the file is replaced, and a lock on the old one would
        # not keep the next append from reading the new one too early.
        fcntl.flock(directory, fcntl.LOCK_EX)
        return _append_line_locked(path, target, directory, line)
    finally:
        os.close(directory)  # and with it the lock


def _append_line_locked(path: Path, target: Path, directory: int, line: str) -> tuple[Path, int]:
    try:
        before = target.read_bytes()
        owner: os.stat_result | None = target.stat()
    except FileNotFoundError:
        before, owner = b"", None
    except OSError as e:
        raise SidecarError(f"--append: cannot read {path}: {e.strerror}") from None
    if before and not before.endswith(b"\n"):
        before += b"\n"
    after = before + f"{line}\n".encode()
    try:
        text = after.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--append: {path} is not a tokens file (not UTF-8 text)") from None
    try:
        tokens_of(text, str(path))
    except ConfigError as e:
        raise ConfigError(f"--append: nothing added, fix the file by hand first: {e}") from None
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            if owner is not None and (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
                # `sudo … --append` on a file the service's user owns: it must still read it.
                os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
            f.write(after)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
        os.fsync(directory)  # the rename itself survives a power cut
    except OSError as e:
        if temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        raise SidecarError(f"--append: cannot write {path}: {e.strerror}") from None
    return target, len(text.splitlines())


def _check_config(args: argparse.Namespace) -> int:
    origins: Origins = {}
    settings = load_settings(getattr(args, "config", None), origins=origins)
    print(render_toml(redacted(settings), origins), end="")
    from caliper_sidecar.reload import restart_only

    # What a SIGHUP to a running sidecar would not apply: changed in the file, these wait for
    # a restart (the running one logs them by name at the SIGHUP).
    print(
        _comment(
            "a SIGHUP applies every key but these, which need a restart: "
            + ", ".join(restart_only())
        )
    )
    # What `run` would refuse is wrong: say so, and fail, as a wrong key does; what it would
    # warn about, say too.
    for warning in preflight(settings, origins).warnings:
        print(f"caliper-sidecar: warning: {warning}", file=sys.stderr)
    return 0


def _time_range(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """`--since` and `--until` as instants; ConfigError (exit 2) when one does not parse or
    the range is empty."""
    now = time.time()
    try:
        since, until = (
            None if text is None else parse_moment(text, now) for text in (args.since, args.until)
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if since is not None and until is not None and until <= since:
        raise ConfigError(f"--until {args.until} is not after --since {args.since}")
    return since, until


def _reconcile(args: argparse.Namespace) -> int:
    from caliper_sidecar.tools.reconcile import reconcile

    since, until = _time_range(args)
    settings = _settings(args)
    # What went wrong is said to stderr; token refreshes and the like are not news here.
    configure_logging("warning", "console")
    reason = reconcile_unavailable(settings)
    if reason is not None:
        print(f"caliper-sidecar: {reason}", file=sys.stderr)
        return 2

    async def go() -> int:
        async with _open_outbox(args, settings) as outbox:
            return await reconcile(settings, outbox, since, until, args.dry_run)

    return asyncio.run(go())


def _comment(text: str, width: int = 96) -> str:
    """Text as TOML comment lines."""
    import textwrap

    return "\n".join("# " + line for line in textwrap.wrap(text, width))


def _tail(args: argparse.Namespace) -> int:
    from caliper_sidecar.tools.tail import tail

    settings = _settings(args)
    try:
        return asyncio.run(tail(settings, args.json))
    except KeyboardInterrupt:
        return 0


def _open_outbox(args: argparse.Namespace, settings: Settings | None = None) -> Any:
    """The outbox the configuration names, opened beside a running `run` (no lock), without
    destination plans: what is stored of each destination is left as it is."""
    from caliper_sidecar.outbox import open_outbox

    settings = settings or _settings(args)
    if not settings.outbox.url and not Path(settings.outbox.path).exists():
        raise SidecarError(f"there is no outbox at {settings.outbox.path} (outbox.path)")
    return open_outbox(settings.outbox, exclusive=False, reconciling=settings.reconcile.after_s > 0)


def _outbox_stats(args: argparse.Namespace) -> int:
    from caliper_sidecar.codec import utc_from_timestamp

    async def go() -> int:
        settings = _settings(args)
        async with _open_outbox(args, settings) as outbox:
            stats = await outbox.stats()
            # The configuration names the destinations: the outbox is opened without them (an
            # inspection leaves their stored state as it is).
            theirs = [(d, await _destination_stats(outbox, d.name)) for d in settings.destinations]
        destinations: list[dict[str, Any]] = [
            {
                "name": UPSTREAM,
                "kind": "caliper",
                "waiting": stats.events,
                "oldest_received_at": utc_from_timestamp(stats.oldest_received_at),
                "delivered_total": stats.delivered_total,
                "dead_letters": stats.dead_letters,
                "dead_lettered_total": stats.dead_lettered_total,
            }
        ]
        destinations += [
            {
                "name": d.name,
                "kind": d.kind,
                "waiting": s.waiting,
                "oldest_received_at": utc_from_timestamp(s.oldest_received_at),
                "delivered_total": s.delivered_total,
                "dead_letters": s.dead_letters,
                "dead_lettered_total": s.dead_lettered_total,
            }
            if s is not None
            # Configured, but no `run` has started with it yet: it has no place in the queue.
            else dict.fromkeys(NUMBERS, None) | {"name": d.name, "kind": d.kind}
            for d, s in theirs
        ]
        report: dict[str, Any] = {
            # The file, or the database (its URL may hold a password: never printed).
            "path": "postgresql" if settings.outbox.url else settings.outbox.path,
            "events": stats.events,
            "bytes": stats.bytes,
            "oldest_received_at": utc_from_timestamp(stats.oldest_received_at),
            "dead_letters": stats.dead_letters,
            "delivered_total": stats.delivered_total,
            "dead_lettered_total": stats.dead_lettered_total,
            "platform_jobs": stats.platform_jobs,
        }
        if args.json:
            print(json.dumps(report | {"destinations": destinations}, indent=2))
            return 0
        width = max(len(k) for k in report)
        for key, value in report.items():
            shown = "-" if value is None or value == {} else value
            print(f"{key.replace('_', ' '):<{width}}  {shown}")
        if settings.destinations:
            # One line per destination, [upstream]'s first: what each still has to take.
            names = max(len(d["name"]) for d in destinations)
            for d in destinations:
                start = f"destination {d['name']:<{names}}  {d['kind']:<7}"
                if d["waiting"] is None:
                    print(f"{start}  not started yet (no `run` with it so far)")
                    continue
                print(
                    f"{start}  waiting {d['waiting']}  oldest {d['oldest_received_at'] or '-'}"
                    f"  delivered {d['delivered_total']}  dead letters {d['dead_letters']}"
                    f" (dead-lettered in all {d['dead_lettered_total']})"
                )
        return 0

    return asyncio.run(go())


#: a destination's figures in `outbox stats --json`
NUMBERS = (
    "waiting",
    "oldest_received_at",
    "delivered_total",
    "dead_letters",
    "dead_lettered_total",
)


async def _destination_stats(outbox: Outbox, name: str) -> DestinationStats | None:
    """A destination's figures, or None when the outbox does not know it yet."""
    try:
        return await outbox.destination_stats(name)
    except OutboxUnavailable as e:
        if e.reason == "unknown_destination":
            return None
        raise


def _replay(args: argparse.Namespace) -> int:
    import time

    from caliper_sidecar.tools.replay import check_known, plan_replay, replay_archive, report

    settings = _settings(args)
    plan = plan_replay(
        settings, args.since, args.until, args.actor, args.to, args.source, time.time()
    )

    def progress(done: int) -> None:
        print(f"replay: {done} events queued so far", file=sys.stderr, flush=True)

    async def go() -> Any:
        async with _open_outbox(args, settings) as outbox:
            await check_known(outbox, plan.queues)
            return await replay_archive(outbox, plan, progress)

    tally = asyncio.run(go())
    for line in report(plan, tally):
        print(line)
    if tally.queued:
        print("the running sidecar sends them within a second")
    return 0


def _dead_list(args: argparse.Namespace) -> int:
    from caliper_sidecar.codec import utc_from_timestamp
    from caliper_sidecar.http.admin import dead_letter_document
    from caliper_sidecar.http.bodies import encode
    from caliper_sidecar.outbox.records import DEAD_CHUNK

    async def go() -> int:
        shown, after = 0, args.after
        async with _open_outbox(args) as outbox:
            # Page by page, printed as they come: a list of 100,000 is never in memory at once.
            while shown < args.limit:
                items = await outbox.dead_letters(
                    min(DEAD_CHUNK, args.limit - shown), after, args.destination
                )
                for d in items:
                    if args.json:
                        print(encode(dead_letter_document(d)).decode())
                    else:
                        status = f"HTTP {d.status}" if d.status else "-"
                        print(
                            f"{d.id}  {d.destination}  {utc_from_timestamp(d.dead_lettered_at)}  "
                            f"{d.reason}  {status}  attempts={d.attempts}  "
                            f"{d.response[:120]}"
                        )
                shown += len(items)
                if len(items) < DEAD_CHUNK:
                    break
                after = items[-1].id
        if not args.json:
            print(f"{shown} dead letter(s)", file=sys.stderr)
        return 0

    return asyncio.run(go())


def _dead_replay(args: argparse.Namespace) -> int:
    count, unknown = _on_dead_letters(args, "replay_dead_letters")
    print(f"replayed {count} dead letter(s); the running sidecar sends them within a second")
    return 1 if unknown else 0


def _dead_purge(args: argparse.Namespace) -> int:
    count, unknown = _on_dead_letters(args, "purge_dead_letters")
    print(f"purged {count} dead letter(s)")
    return 1 if unknown else 0


def _on_dead_letters(args: argparse.Namespace, operation: str) -> tuple[int, list[str]]:
    """Apply an outbox operation to the dead letters named on the command line (or all),
    with a running count on stderr (it goes a chunk at a time); ids that are not dead
    letters are named, and make the exit code 1."""
    verb = operation.split("_")[0]
    unknown: list[str] = []
    settings = _settings(args)
    destination: str | None = args.destination
    configured = {UPSTREAM, *(d.name for d in settings.destinations)}
    if verb == "replay" and destination is not None and destination not in configured:
        # Nothing would take them: say so rather than "replayed 0".
        raise ConfigError(
            f"--destination {destination}: not a destination of this configuration (upstream, "
            f"or a [[destinations]] name: {', '.join(sorted(configured))}); its dead letters "
            "can be listed and purged, not replayed"
        )

    def progress(done: int) -> None:
        print(f"{verb}: {done} dead letter(s) so far", file=sys.stderr, flush=True)

    async def go() -> int:
        async with _open_outbox(args, settings) as outbox:
            if not args.all:
                found = await outbox.journeys(args.ids)
                unknown.extend(
                    i for i in args.ids if not _dead_at(found.get(canonical_id(i)), destination)
                )
            selection = None if args.all else args.ids
            count: int = await getattr(outbox, operation)(
                selection, progress=progress, destination=destination
            )
            return count

    count = asyncio.run(go())
    if unknown:
        print(f"not dead letters (nothing done): {', '.join(unknown)}", file=sys.stderr)
    return count, unknown


#: `erase`'s exit status when the events were removed but the outbox's files may still hold
#: their bytes (the rewrite or the WAL's truncation could not be done yet)
ERASED_NOT_REWRITTEN = 3


def _erase(args: argparse.Namespace) -> int:
    """See docs/operators.md, "Erasing a learner"."""
    import hashlib

    import structlog

    from caliper_sidecar.delivery.archive_erase import erase_from_archive

    actor: str = args.actor
    if not actor.strip():
        raise ConfigError("--actor: empty; give the learner's id (an event's actor, or actor.id)")
    settings = _settings(args)
    configure_logging(settings.log.level, settings.log.format)
    dry: bool = args.dry_run
    archives = [d for d in settings.destinations if d.kind == "archive"]

    async def go() -> tuple[Erasure, dict[str, ArchiveErasure], bool]:
        async with _open_outbox(args, settings) as outbox:
            # The queue first, so that no waiting event of the learner is archived (or sent)
            # after its archive was read; then the archives; then, by id, the rows kept after
            # delivery whose bodies are gone, which only an archive's lines tie to the learner.
            found = await outbox.erase(actor, dry_run=dry)
            archived = {
                d.name: await asyncio.to_thread(erase_from_archive, Path(d.dir), actor, dry)
                for d in archives
            }
            only_archived = {i for a in archived.values() for i in a.ids if i} - found.ids
            if only_archived:
                found += await outbox.erase(None, sorted(only_archived), dry_run=dry)
            # Even when nothing matched: a run after one that exited 3 finishes its job.
            forgotten = dry or await outbox.forget_erased()
            return found, archived, forgotten

    found, archived, forgotten = asyncio.run(go())
    digest = hashlib.sha256(actor.encode()).hexdigest()[:16]
    structlog.get_logger("sidecar.cli").info(
        "erase",
        actor_sha256=digest,
        dry_run=dry,
        waiting=found.waiting,
        kept=found.kept,
        dead_letters=found.dead_letters,
        archive_lines={name: a.total for name, a in archived.items()},
        delivered_to=found.delivered_to,
        # SQLite's claims live in `run`'s memory: not known here.
        in_flight=found.in_flight if settings.outbox.url else None,
        rewritten=forgotten,
    )
    print(_erase_report(digest, dry, found, archived, settings), end="")
    if not forgotten:
        print(
            "caliper-sidecar: the events are removed, but the outbox's files could not all be "
            "rewritten yet (SQLite: `run` kept its -wal file in use; PostgreSQL: a session kept "
            "a snapshot from before the erase, or a table locked): their bytes may remain "
            "there until they are. Run the same command again: even with nothing left to "
            "remove, it rewrites the outbox",
            file=sys.stderr,
        )
        return ERASED_NOT_REWRITTEN
    if not found.ids and not any(a.total for a in archived.values()):
        print(
            "caliper-sidecar: no event of that actor in the outbox, its dead letters or the "
            "archives: nothing changed (an actor is matched exactly, as the event has it)",
            file=sys.stderr,
        )
        return 1
    return 0


def _erase_report(
    digest: str,
    dry: bool,
    found: Erasure,
    archived: dict[str, ArchiveErasure],
    settings: Settings,
) -> str:
    """What `erase` removed where (or would, with --dry-run), for the operator."""
    verb = "would remove" if dry else "removed"
    lines = [f"erase: actor sha256:{digest}{' (dry run: nothing changed)' if dry else ''}"]
    lines.append(
        f"outbox: {verb} {found.events} event(s): {found.waiting} waiting, {found.kept} "
        "no longer waiting (kept for deduplication and journeys)"
    )
    dead = sum(found.dead_letters.values())
    per = ", ".join(f"{k} {v}" for k, v in sorted(found.dead_letters.items()))
    lines.append(f"dead letters: {verb} {dead}{f' ({per})' if per else ''}")
    for name, a in archived.items():
        lines.append(
            f"archive {name}: {verb} {a.total} line(s) from {len(a.lines)} file(s)"
            + "".join(f"\n  {file}  {n}" for file, n in sorted(a.lines.items()))
        )
    kinds = {UPSTREAM: "caliper", **{d.name: d.kind for d in settings.destinations}}
    elsewhere = {
        name: n for name, n in found.delivered_to.items() if kinds.get(name) != "archive" and n
    }
    if elsewhere:
        lines.append(
            "already delivered: the sidecar cannot take these back; erase them at each "
            "destination too:"
        )
        width = max(len(name) for name in elsewhere)
        lines += [f"  {name:<{width}}  {n} event(s)" for name, n in sorted(elsewhere.items())]
    else:
        lines.append("already delivered: none outside the archives, as far as the outbox knows")
    archived_only = {i for a in archived.values() for i in a.ids} - found.ids
    if archived_only:
        lines.append(
            f"archives only: {len(archived_only)} event(s) the outbox no longer knows (delivered, "
            "or dead-lettered, longer ago than outbox.dedupe_window_s): they went to every "
            "destination configured then; erase them there too"
        )
    if settings.outbox.url and found.in_flight:
        lines.append(
            f"in flight: {found.in_flight} of the waiting event(s) were in a batch a replica "
            "had claimed at that instant: they may still be sent; see docs/operators.md"
        )
    elif not settings.outbox.url and found.waiting and not dry:
        lines.append(
            "in flight: a batch `run` had claimed at that instant may still be sent (its "
            "claims live in its memory: not counted here); see docs/operators.md"
        )
    return "\n".join(lines) + "\n"


def _dead_at(journey: Journey | None, destination: str | None) -> bool:
    """Whether the event is a dead letter of that destination (None: of any)."""
    if journey is None:
        return False
    dead = {name for name, part in journey.destinations.items() if part.state == "dead_lettered"}
    if journey.dead_letter is not None:
        dead.add(UPSTREAM)
    return bool(dead) if destination is None else destination in dead
