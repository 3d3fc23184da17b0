"""SIGHUP: apply what may change without a restart, without refusing a request.

Reloaded (RELOADED, and each destination's DESTINATION_RELOADABLE): the sender tokens, the TLS
certificate and key (new connections get the new ones: the live SSL context loads them),
`admin.token`, `log.level`, `receiver.cors_origins` and `receiver.server_names`,
`validation.mode`, `retry.*`, and what a rotation or a tuning changes: the OAuth client secret
or private key, a static bearer token, and the batching, concurrency and timeout of
`[upstream]` and of each destination. The routes read the settings at each request, so swapping
them is their switch; the dispatchers and token sources are handed theirs (`retune`,
`rotate`): the next claim, send or token request uses them, sends in flight finish as they
are.

A reload that fails (an unreadable file, a bad certificate or private key) changes nothing and
says why, and so does one that would leave fewer kinds of protection than are in force (no
sender tokens where there were some, no admin token where there was one): a file read while it
is rewritten must not switch a protection off; that takes a restart. Keys that decide where
events go (the platform, endpoints, token URLs, `outbox.*`, destinations added or removed) are
named as needing a restart (docs/operators.md).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final

import msgspec
import structlog

from caliper_sidecar.config import (
    DESTINATION_RELOADABLE,
    SECTIONS,
    DestinationSettings,
    OAuthSettings,
    Settings,
)
from caliper_sidecar.delivery.upstream import UpstreamClient
from caliper_sidecar.exceptions import SidecarError
from caliper_sidecar.http.runtime import Runtime
from caliper_sidecar.logs import set_level
from caliper_sidecar.preflight import check_oauth_private_key, check_private_key, check_tls

log = structlog.get_logger("sidecar.reload")

#: the keys of [upstream] a SIGHUP applies (its tuning and its static token)
UPSTREAM_RELOADED: Final = frozenset(
    {"bearer_token", "batch_max_events", "batch_max_bytes", "linger_ms", "concurrency", "timeout_s"}
)
RELOADED: Final = frozenset(
    {
        ("receiver", "tokens"),
        ("receiver", "tls_cert"),
        ("receiver", "tls_key"),
        ("receiver", "cors_origins"),
        ("receiver", "server_names"),
        ("admin", "token"),
        ("log", "level"),
        ("oauth", "client_secret"),
        ("oauth", "private_key_file"),
        ("validation", "mode"),
        *(("retry", f.name) for f in msgspec.structs.fields(SECTIONS["retry"])),
        *(("upstream", key) for key in UPSTREAM_RELOADED),
    }
)
#: the secrets among them: new ones are tried at once where the old ones were refused
_SECRETS: Final = frozenset(
    {("oauth", "client_secret"), ("oauth", "private_key_file"), ("upstream", "bearer_token")}
)


def restart_only() -> list[str]:
    """Every key a SIGHUP does not apply, as `section.key` (what check-config names)."""
    keys = [
        f"{section}.{f.name}"
        for section, kind in SECTIONS.items()
        for f in msgspec.structs.fields(kind)
        if (section, f.name) not in RELOADED
    ]
    keys += [
        f"destinations[].{f.name}"
        for f in msgspec.structs.fields(DestinationSettings)
        if f.name not in DESTINATION_RELOADABLE and f.name != "oauth"
    ]
    keys += [
        f"destinations[].oauth.{f.name}"
        for f in msgspec.structs.fields(OAuthSettings)
        if f"oauth.{f.name}" not in DESTINATION_RELOADABLE
    ]
    return [*keys, "destinations added or removed"]


def reload(rt: Runtime, tls: ssl.SSLContext | None, load: Callable[[], Settings]) -> bool:
    """Read the configuration again and apply what may change now; True when applied."""
    try:
        new = load()
        fresh_tls = check_tls(new)
        check_private_key(new)
        for index, d in enumerate(new.destinations):
            check_oauth_private_key(d.oauth, f"destinations[{index}].oauth")
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
    later = sorted([f"{s}.{k}" for s, k in changed - RELOADED] + [*destinations.restart])
    applied = sorted([f"{s}.{k}" for s, k in changed & RELOADED] + [*destinations.reloadable])
    if (tls is None) != (fresh_tls is None):
        later.append("receiver.tls_cert (TLS turned on or off)")
    elif tls is not None:
        # Always: a renewed certificate is usually new files at the same paths. The context
        # the listener already uses takes the pair, and new handshakes get it.
        tls.load_cert_chain(new.receiver.tls_cert, new.receiver.tls_key)
        applied = sorted({*applied, "receiver.tls_cert", "receiver.tls_key"})
    merged = _merged(old, new, keep_tls=tls is None)
    _retune(rt, merged, new_secrets=bool(changed & _SECRETS), destinations=destinations)
    rt.use_settings(merged)
    # Said before a new level applies: a level raised to warning must not hide the line that
    # says so.
    log.info("reloaded", applied=applied, needs_restart=later)
    set_level(new.log.level)
    return True


def _merged(old: Settings, new: Settings, keep_tls: bool) -> Settings:
    """The running settings with what a SIGHUP applies taken from the new ones."""

    def take(section: str) -> Any:
        before, after = getattr(old, section), getattr(new, section)
        keys = {k for s, k in RELOADED if s == section}
        if keep_tls and section == "receiver":
            keys -= {"tls_cert", "tls_key"}
        return msgspec.structs.replace(before, **{k: getattr(after, k) for k in keys})

    theirs = {d.name: d for d in new.destinations}
    return msgspec.structs.replace(
        old,
        **{section: take(section) for section in {s for s, _ in RELOADED}},
        destinations=tuple(
            _merged_destination(d, theirs[d.name]) if d.name in theirs else d
            for d in old.destinations
        ),
    )


def _merged_destination(old: DestinationSettings, new: DestinationSettings) -> DestinationSettings:
    oauth = msgspec.structs.replace(
        old.oauth,
        **{
            key.removeprefix("oauth."): getattr(new.oauth, key.removeprefix("oauth."))
            for key in DESTINATION_RELOADABLE
            if key.startswith("oauth.")
        },
    )
    return msgspec.structs.replace(
        old,
        oauth=oauth,
        **{k: getattr(new, k) for k in DESTINATION_RELOADABLE if not k.startswith("oauth.")},
    )


def _retune(
    rt: Runtime, merged: Settings, new_secrets: bool, destinations: DestinationChanges
) -> None:
    """Hand the dispatchers and token sources their new settings."""
    upstream = merged.upstream
    if rt.tokens is not None:
        rt.tokens.rotate(merged.oauth, upstream.bearer_token, upstream.timeout_s)
    if rt.dispatcher is not None:
        rt.dispatcher.retune(upstream, merged.retry)
        sender = rt.dispatcher.sender
        if isinstance(sender, UpstreamClient):
            sender.retune(upstream.timeout_s)
            rt.max_event_bytes = upstream.batch_max_bytes - sender.overhead
        if new_secrets:
            rt.dispatcher.credentials_changed()
    theirs = {d.name: d for d in merged.destinations}
    secrets_of = {key.split(".")[1] for key in destinations.reloadable if _is_secret(key)}
    kept = []
    for d in rt.destinations:
        mine = theirs[d.settings.name]
        # An archive batches as archives do (ARCHIVE_BATCHING), whatever its table says.
        d.dispatcher.retune(mine if mine.kind == "caliper" else d.dispatcher.batching, merged.retry)
        if isinstance(d.dispatcher.sender, UpstreamClient):
            d.dispatcher.sender.retune(mine.timeout_s)
        if d.tokens is not None:
            d.tokens.rotate(mine.oauth, mine.bearer_token, mine.timeout_s)
        if mine.name in secrets_of:
            d.dispatcher.credentials_changed()
        kept.append(replace(d, settings=mine))
    rt.destinations = tuple(kept)


def _is_secret(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("bearer_token", "client_secret", "private_key_file")


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
