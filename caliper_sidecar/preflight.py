"""What `run` checks before it starts, and `check-config` checks too, with the same verdict:
the errors `run` would stop on (exit 2), and the warnings it would log.

Errors: an upstream it cannot send to, TLS files or a private key it cannot load, an outbox or
archive directory it cannot write, a PostgreSQL URL that does not parse, reconciliation toward
a platform that lists nothing. Warnings: a platform
that does not match its endpoint's path, a file holding secrets that others can read, running as
root.
"""

from __future__ import annotations

import importlib.util
import os
import ssl
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from caliper_sidecar.config import OAuthSettings, Origins, Settings, is_secret, require_upstream
from caliper_sidecar.exceptions import ArchiveUnusable, ConfigError
from caliper_sidecar.presets import events_url, platform_mismatch

POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class Checked:
    """What the checks found: warnings to give, and the receiver's TLS context (loaded once,
    used by the listener)."""

    warnings: list[str]
    tls: ssl.SSLContext | None


def preflight(settings: Settings, origins: Origins | None = None) -> Checked:
    """Raise ConfigError for what `run` would refuse; return what it would warn about."""
    require_upstream(settings)
    tls = check_tls(settings)
    check_private_key(settings)
    if settings.outbox.url:
        check_postgres_url(settings.outbox.url)
    else:
        check_outbox_directory(Path(settings.outbox.path))
    check_reconcile(settings)
    for index, destination in enumerate(settings.destinations):
        where = f"destinations[{index}]"
        if destination.kind == "archive":
            check_archive_directory(Path(destination.dir), f"{where}.dir")
        else:
            check_oauth_private_key(destination.oauth, f"{where}.oauth")
    warnings = []
    mismatch = platform_mismatch(settings.upstream.platform, settings.upstream.endpoint)
    if mismatch is not None:
        warnings.append(mismatch)
    warnings += readable_secrets(origins or {})
    if os.geteuid() == 0:
        warnings.append(
            "running as root: a bug or a hostile input would have the whole machine; run as "
            "a user of its own (the systemd unit and the image do)"
        )
    return Checked(warnings, tls)


def check_reconcile(settings: Settings) -> None:
    """Reconciliation lists what the platform holds: only where it lists (Beyond AI)."""
    reason = reconcile_unavailable(settings)
    if settings.reconcile.after_s and reason is not None:
        raise ConfigError(f"reconcile.after_s is set, but {reason}: set reconcile.after_s = 0")


def reconcile_unavailable(settings: Settings) -> str | None:
    """Why reconciliation cannot be done toward this upstream, or None when it can."""
    if events_url(settings.upstream.endpoint) is not None:
        return None
    return (
        f"reconcile is not available: upstream.endpoint {settings.upstream.endpoint!r} lists "
        "no events (only Beyond AI's /caliper/event has GET /caliper/events beside it; "
        "LearnWith.AI lists nothing)"
    )


def check_tls(settings: Settings) -> ssl.SSLContext | None:
    """The receiver's TLS context, or None without TLS; ConfigError when it cannot load."""
    r = settings.receiver
    if not r.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(r.tls_cert, r.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"receiver.tls_cert / receiver.tls_key cannot be loaded: {e}") from None
    return context


def check_private_key(settings: Settings) -> None:
    check_oauth_private_key(settings.oauth, "oauth")


def check_oauth_private_key(o: OAuthSettings, table: str) -> None:
    """The PEM key of an OAuth table (`table`: its name in messages) that signs with one."""
    if not o.token_url or o.auth_method != "private_key_jwt":
        return
    try:
        text = Path(o.private_key_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "it is not text"
        raise ConfigError(f"{table}.private_key_file cannot be read: {why}") from None
    if "PRIVATE KEY-----" not in text:
        raise ConfigError(f"{table}.private_key_file holds no PEM private key")


def check_postgres_url(url: str) -> None:
    """A URL asyncpg will take: its scheme, host and port (never echoed: it may hold a
    password)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in range
        host = parts.hostname
    except ValueError as e:
        raise ConfigError(f"outbox.url does not parse: {e}") from None
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ConfigError(
            f"outbox.url must start with postgresql:// (got the scheme {parts.scheme!r})"
        )
    if port == 0:
        raise ConfigError("outbox.url: port 0 is no port")
    if parts.netloc and not host and "@" not in parts.netloc:
        raise ConfigError("outbox.url has no host")
    if importlib.util.find_spec("asyncpg") is None:
        raise ConfigError(
            "outbox.url names a PostgreSQL outbox, whose driver is not installed: "
            "pip install 'caliper-sidecar[postgres]'"
        )


def check_outbox_directory(path: Path) -> None:
    """The outbox file can be created (or written) where `outbox.path` says."""
    if path.exists():
        if path.is_dir():
            raise ConfigError(f"outbox.path {path} is a directory, not a file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"outbox.path {path} cannot be written by this user")
        return
    parent = _nearest_existing(path.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"outbox.path {path}: this user cannot create it in {parent} (not writable)"
        )


def check_archive_directory(path: Path, key: str = "archive dir") -> None:
    """Raise ArchiveUnusable (a ConfigError: exit 2), naming `key` and the dir, unless this user
    can write files in `path`, or create it (the nearest of its ancestors that exists is a
    directory this user can write). `run` and `check-config` check each archive's `dir` here,
    and the archive again when it opens (delivery/archive.py): one verdict, refused before the
    first event rather than at it."""
    try:
        existing = _nearest_existing(path)
        if not existing.is_dir():
            where = "is" if existing == path else f"cannot be created: {existing} is"
            raise ArchiveUnusable(f"{key} {path} {where} not a directory")
        if existing != path:
            if not os.access(existing, os.W_OK | os.X_OK):
                raise ArchiveUnusable(
                    f"{key} {path}: cannot be created in {existing}: this user cannot write there"
                )
            return
        # A real file, not os.access: read-only mounts, ACLs and root squash answer too.
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        what = e.strerror or str(e)
        raise ArchiveUnusable(f"{key} {path}: this user cannot write there ({what})") from None


def _nearest_existing(path: Path) -> Path:
    """`path`, or the nearest of its ancestors that exists (`run` creates the others)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def readable_secrets(origins: Origins) -> list[str]:
    """Files holding secrets (the configuration file, `*_file` secrets) that others can read."""
    files: set[str] = set()
    for key, origin in origins.items():
        if not is_secret(*key):
            continue
        secret_file = origin.rpartition("secret file ")[2] if "secret file " in origin else None
        if secret_file is not None:
            files.add(secret_file)  # the configuration held only its name
        elif origin.startswith("file "):
            files.add(origin.removeprefix("file "))
    out = []
    for name in sorted(files):
        try:
            mode = os.stat(name).st_mode
        except OSError:
            continue
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            out.append(
                f"{name} holds secrets and others can read it (mode {stat.filemode(mode)}): "
                f"chmod 600 {name}"
            )
    return out
