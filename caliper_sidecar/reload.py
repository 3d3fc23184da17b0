"""SIGHUP: apply what may change without a restart, without refusing a request.

Reloaded: the sender tokens (`receiver.tokens`, `receiver.tokens_file`), the TLS certificate and
key (new connections get the new ones: the live SSL context loads them), `admin.token` and
`log.level`. The routes read the settings at each request, so swapping them is the whole
switch. A reload that fails (an unreadable file, a bad certificate, a wrong key) changes
nothing and says why, and so does one that would leave fewer kinds of protection than are in
force (no sender tokens where there were some, no admin token where there was one): a file read
while it is rewritten must not switch a protection off; that takes a restart. Other keys changed
in the file are named as needing a restart (docs/operators.md).

`[[destinations]]` are told apart by name (destination_changes): a destination added or
removed, or a key of one changed that is not in DESTINATION_RELOADABLE (its secrets, its
tuning), needs a restart. Nothing applies the reloadable ones yet, so they are named as needing
a restart too, until the dispatcher takes them.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import structlog

from caliper_sidecar.config import (
    DESTINATION_RELOADABLE,
    SECTIONS,
    DestinationSettings,
    Settings,
)
from caliper_sidecar.exceptions import SidecarError
from caliper_sidecar.http.runtime import Runtime
from caliper_sidecar.logs import set_level
from caliper_sidecar.preflight import check_tls

log = structlog.get_logger("sidecar.reload")

RELOADED: Final = frozenset(
    {
        ("receiver", "tokens"),
        ("receiver", "tls_cert"),
        ("receiver", "tls_key"),
        ("admin", "token"),
        ("log", "level"),
    }
)


def reload(rt: Runtime, tls: ssl.SSLContext | None, load: Callable[[], Settings]) -> bool:
    """Read the configuration again and apply what may change now; True when applied."""
    try:
        new = load()
        fresh_tls = check_tls(new)
    except (SidecarError, OSError) as e:
        log.error("reload_failed", error=str(e), kept="the configuration as it was")
        return False
    old = rt.settings
    lost = _protections_lost(old, new)
    if lost:
        log.error(
            "reload_failed",
            error=f"the configuration read has {' and '.join(lost)}, where the running one has; "
            "a file caught empty while it is rewritten looks the same: to switch a protection "
            "off, restart",
            kept="the configuration as it was",
        )
        return False
    changed = _changed(old, new)
    destinations = destination_changes(old, new)
    # The reloadable ones too: nothing applies a destination's keys at SIGHUP yet.
    later = sorted(
        [f"{s}.{k}" for s, k in changed - RELOADED]
        + [*destinations.restart, *destinations.reloadable]
    )
    applied = sorted(f"{s}.{k}" for s, k in changed & RELOADED)
    if (tls is None) != (fresh_tls is None):
        later.append("receiver.tls_cert (TLS turned on or off)")
    elif tls is not None:
        # Always: a renewed certificate is usually new files at the same paths. The context
        # the listener already uses takes the pair, and new handshakes get it.
        tls.load_cert_chain(new.receiver.tls_cert, new.receiver.tls_key)
        applied = sorted({*applied, "receiver.tls_cert", "receiver.tls_key"})
    rt.settings = msgspec.structs.replace(
        old,
        receiver=msgspec.structs.replace(
            old.receiver,
            tokens=new.receiver.tokens,
            tls_cert=new.receiver.tls_cert if tls is not None else old.receiver.tls_cert,
            tls_key=new.receiver.tls_key if tls is not None else old.receiver.tls_key,
        ),
        admin=msgspec.structs.replace(old.admin, token=new.admin.token),
        log=msgspec.structs.replace(old.log, level=new.log.level),
    )
    set_level(new.log.level)
    log.warning("reloaded", applied=applied, needs_restart=later)
    return True


def _protections_lost(old: Settings, new: Settings) -> list[str]:
    """The kinds of protection in force under `old` that `new` would switch off, in words."""
    lost = []
    if old.receiver.tokens and not new.receiver.tokens:
        lost.append("no sender tokens (receiver.tokens, receiver.tokens_file)")
    if old.admin.token and not new.admin.token:
        lost.append("no admin token (admin.token, admin.token_file)")
    return lost


def _changed(old: Settings, new: Settings) -> set[tuple[str, str]]:
    """The (section, key) pairs whose values differ (`[[destinations]]` aside)."""
    out = set()
    for section in SECTIONS:
        before: Any = getattr(old, section)
        after: Any = getattr(new, section)
        for key in msgspec.structs.fields(before):
            if getattr(before, key.name) != getattr(after, key.name):
                out.add((section, key.name))
    return out


@dataclass(frozen=True)
class DestinationChanges:
    """What changed in `[[destinations]]` between two configurations, sorted, each named
    `destinations.<name>.<key>` (`oauth.<key>` for its OAuth table) or `destinations.<name>
    (added)` / `(removed)`: what SIGHUP may apply, and what needs a restart."""

    reloadable: tuple[str, ...]
    restart: tuple[str, ...]


def destination_changes(old: Settings, new: Settings) -> DestinationChanges:
    """Tell the destinations apart by name (a renamed one is one removed and one added), and
    each changed key of those in both by DESTINATION_RELOADABLE."""
    before = {d.name: d for d in old.destinations}
    after = {d.name: d for d in new.destinations}
    reloadable: list[str] = []
    restart = [f"destinations.{name} (added)" for name in after.keys() - before.keys()]
    restart += [f"destinations.{name} (removed)" for name in before.keys() - after.keys()]
    for name in before.keys() & after.keys():
        for key in _keys_changed(before[name], after[name]):
            changes = reloadable if key in DESTINATION_RELOADABLE else restart
            changes.append(f"destinations.{name}.{key}")
    return DestinationChanges(tuple(sorted(reloadable)), tuple(sorted(restart)))


def _keys_changed(before: DestinationSettings, after: DestinationSettings) -> list[str]:
    """The keys of a destination whose values differ, `oauth.<key>` for its OAuth table's."""
    out = []
    for field in msgspec.structs.fields(before):
        was, now = getattr(before, field.name), getattr(after, field.name)
        if field.name == "oauth":
            out += [
                f"oauth.{key.name}"
                for key in msgspec.structs.fields(was)
                if getattr(was, key.name) != getattr(now, key.name)
            ]
        elif was != now:
            out.append(field.name)
    return out
