"""Settings: one immutable, typed object built at start-up from a TOML file, the environment and
secret files, then passed down. Every mistake is reported with the name of the key at fault."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, get_type_hints

from caliper_sidecar.exceptions import ConfigError
from caliper_sidecar.presets import PLATFORMS, PRESETS, PROFILES

ENV_PREFIX: Final = "SIDECAR_"
CONFIG_ENV: Final = "SIDECAR_CONFIG"
REDACTED: Final = "<redacted>"
#: the shortest sender token accepted (SPEC §3): 16 random characters are ~96 bits
MIN_SENDER_TOKEN: Final = 16


class Secret(str):
    """A secret value: the string itself to the code that uses it, masked in every repr (so no
    traceback, log line or debugger print of a settings section can show it)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('**********')" if self else "Secret('')"


class SenderToken(Secret):
    """A sender token from `receiver.tokens_file`, with the label written before it there
    (`room-12 3f9c…`): the label names the sender in logs, metrics and journeys."""

    def __new__(cls, value: str, label: str | None = None) -> SenderToken:
        token = super().__new__(cls, value)
        token.label = label
        return token

    label: str | None


def _secret(value: str) -> Secret:
    return value if isinstance(value, Secret) else Secret(value)


def _mask(section: Any, *keys: str) -> None:
    """Wrap a frozen section's secret fields in Secret (tests and code may pass plain str)."""
    for key in keys:
        value = getattr(section, key)
        masked = tuple(_secret(v) for v in value) if isinstance(value, tuple) else _secret(value)
        object.__setattr__(section, key, masked)


@dataclass(frozen=True)
class ReceiverSettings:
    """Where and how apps send events to the sidecar."""

    host: str = "127.0.0.1"
    port: int = 8787
    max_body_bytes: int = 1_048_576
    max_events_per_request: int = 1000
    tokens: tuple[str, ...] = ()
    #: web origins allowed to send from a browser (and to make admin requests from a page)
    cors_origins: tuple[str, ...] = ()
    #: host names the sidecar is reached by besides IP literals and localhost
    server_names: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        _mask(self, "tokens")


@dataclass(frozen=True)
class OutboxSettings:
    """The durable queue between the receiver and the dispatcher: one SQLite file (`path`, the
    embedded default), or a PostgreSQL database shared by replicas (`url`)."""

    path: str = "data/outbox.db"
    url: str = ""
    synchronous: str = "full"
    max_events: int = 1_000_000
    max_bytes: int = 1_073_741_824
    dedupe_window_s: float = 86_400

    def __post_init__(self) -> None:
        _mask(self, "url")  # it may hold the database's password


@dataclass(frozen=True)
class UpstreamSettings:
    """The Caliper endpoint events are forwarded to, and how envelopes are batched."""

    preset: str = ""
    platform: str = "caliper"
    endpoint: str = ""
    sensor: str = ""
    batch_max_events: int = 100
    batch_max_bytes: int = 512_000
    linger_ms: int = 200
    concurrency: int = 4
    timeout_s: float = 30
    bearer_token: str = ""
    jobs_url: str = ""

    def __post_init__(self) -> None:
        _mask(self, "bearer_token")


@dataclass(frozen=True)
class OAuthSettings:
    """OAuth2 client credentials for the upstream; no token_url means no token is fetched."""

    token_url: str = ""
    client_id: str = ""
    client_secret: str = ""
    scope: str = ""
    auth_method: str = "client_secret_basic"
    private_key_file: str = ""
    refresh_leeway_s: float = 60

    def __post_init__(self) -> None:
        _mask(self, "client_secret")


@dataclass(frozen=True)
class RetrySettings:
    """How failed deliveries are retried, and when they give up."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    max_attempts: int = 0
    max_age_s: float = 0
    refusing_grace_s: float = 3600


@dataclass(frozen=True)
class ValidationSettings:
    """How strictly incoming events are checked."""

    mode: str = "strict"
    profile: str = "timeback"


@dataclass(frozen=True)
class OpsSettings:
    """Where operators' routes (health, readiness, metrics, status, dead letters) listen.

    `port = 0`: on the receiver's own listener. Otherwise a listener of their own, plain HTTP
    on `host` (loopback by default), whatever TLS and tokens the receiver has.
    """

    host: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True)
class AdminSettings:
    """Access to the dead-letter endpoints."""

    token: str = ""

    def __post_init__(self) -> None:
        _mask(self, "token")


@dataclass(frozen=True)
class LogSettings:
    """Log verbosity and rendering."""

    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class Settings:
    """The whole configuration of one sidecar."""

    receiver: ReceiverSettings = field(default_factory=ReceiverSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    oauth: OAuthSettings = field(default_factory=OAuthSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    ops: OpsSettings = field(default_factory=OpsSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def __repr__(self) -> str:
        # The default repr would print secrets into tracebacks and logs.
        return f"Settings({redacted(self)!r})"


SECTIONS: Final[dict[str, type[Any]]] = {
    f.name: get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)
}

#: keys whose values never leave the process; each can also be read from `<key>_file`.
SECRETS: Final = frozenset(
    {
        ("receiver", "tokens"),
        ("upstream", "bearer_token"),
        ("oauth", "client_secret"),
        ("admin", "token"),
        ("outbox", "url"),
    }
)

_CHOICES: Final[dict[tuple[str, str], tuple[str, ...]]] = {
    ("outbox", "synchronous"): ("full", "normal"),
    ("upstream", "platform"): tuple(PLATFORMS),
    ("oauth", "auth_method"): ("client_secret_basic", "client_secret_post", "private_key_jwt"),
    ("validation", "mode"): ("strict", "warn", "off"),
    ("validation", "profile"): PROFILES,
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("log", "format"): ("json", "console"),
}


#: where each key's value came from: "file <path>", "environment <VAR>", "preset <name>"…
Origins = dict[tuple[str, str], str]


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    origins: Origins | None = None,
) -> Settings:
    """Build the settings from a TOML file (or `SIDECAR_CONFIG`), then the environment.

    Raises ConfigError naming the key or variable at fault. When `origins` is given, it is
    filled with where each key that is not a built-in default came from.
    """
    environ = os.environ if environ is None else environ
    origins = {} if origins is None else origins
    path = path or environ.get(CONFIG_ENV) or None
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        raw = _read_toml(Path(path))

    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, table in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in table.items():
            target = _target_key(section, key, f"{section}.{key}")
            values[section][key] = _coerce_toml(section, target, value, f"{section}.{key}")
            origins[(section, key)] = f"file {path}"

    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV or _service_link(var):
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(f"unknown environment variable {var}")
        target = _target_key(section, key, var)
        values[section][key] = _coerce_env(section, target, text, var)
        origins[(section, key)] = f"environment {var}"

    _resolve_secret_files(values, origins)
    _apply_preset(values, origins)
    if "tokens" in values["receiver"]:
        # A blank token is no token: it must neither be accepted nor count as protection.
        values["receiver"]["tokens"] = tuple(t for t in values["receiver"]["tokens"] if t.strip())
    settings = Settings(**{name: cls(**values[name]) for name, cls in SECTIONS.items()})
    _check(settings)
    return settings


#: what Kubernetes injects for a Service named `sidecar` (docker's --link did the same): not
#: configuration, and no section of ours is called `port` or `service`
_SERVICE_LINK: Final = re.compile(r"SIDECAR_(PORT|SERVICE_[A-Z0-9_]+|PORT_\d+_(TCP|UDP|SCTP)\w*)")


def _service_link(var: str) -> bool:
    return _SERVICE_LINK.fullmatch(var) is not None


def _read_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None


def _fields(section: str) -> dict[str, Any]:
    return get_type_hints(SECTIONS[section])


def _target_key(section: str, key: str, where: str) -> str:
    """The settings field a key sets: itself, or the secret behind a `<secret>_file` key."""
    if key in _fields(section):
        return key
    if key.endswith("_file") and (section, key.removesuffix("_file")) in SECRETS:
        return key
    raise ConfigError(f"unknown key {where}")


def _coerce_toml(section: str, key: str, value: Any, where: str) -> Any:
    kind = _fields(section).get(key, str)
    if kind == tuple[str, ...]:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where} must be an array of strings")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, not a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{where} must be {_describe(kind)}, got {type(value).__name__}")
    return value


def _coerce_env(section: str, key: str, text: str, where: str) -> Any:
    kind = _fields(section).get(key, str)
    if kind == tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{where} must be {_describe(kind)}, got {text!r}") from None


def _describe(kind: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _resolve_secret_files(values: dict[str, dict[str, Any]], origins: Origins) -> None:
    for section, key in SECRETS:
        file_key = f"{key}_file"
        file_name = values[section].pop(file_key, "")
        origin = origins.pop((section, file_key), "")
        if not file_name:
            continue
        origins[(section, key)] = f"{origin}, secret file {file_name}".lstrip(", ")
        if values[section].get(key):
            raise ConfigError(f"set {section}.{key} or {section}.{file_key}, not both")
        try:
            text = Path(file_name).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(
                f"{section}.{file_key}: cannot read {file_name}: {e.strerror}"
            ) from None
        if key == "tokens":
            values[section][key] = _tokens_of(text, f"{section}.{file_key} {file_name}")
        else:
            values[section][key] = text.strip()


def _tokens_of(text: str, where: str) -> tuple[SenderToken, ...]:
    """The tokens of a tokens file: one a line, optionally after a label and a space
    (`room-12 3f9c…`, as `caliper-sidecar token new --label room-12` prints it)."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if len(fields) > 2:
            raise ConfigError(
                f"{where}, line {number}: a line is a token, or a label, a space and a token"
            )
        if fields:
            tokens.append(SenderToken(fields[-1], fields[0] if len(fields) == 2 else None))
    return tuple(tokens)


def _apply_preset(values: dict[str, dict[str, Any]], origins: Origins) -> None:
    name = values["upstream"].get("preset", "")
    if not name:
        return
    if name not in PRESETS:
        raise ConfigError(f"upstream.preset {name!r} is unknown (known: {', '.join(PRESETS)})")
    for (section, key), value in PRESETS[name].items():
        if key not in values[section]:
            values[section][key] = value
            origins[(section, key)] = f"preset {name}"


def _check(s: Settings) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(s, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} must be one of {', '.join(allowed)}; got {value!r}")
    positive = {
        "receiver.max_body_bytes": s.receiver.max_body_bytes,
        "receiver.max_events_per_request": s.receiver.max_events_per_request,
        "outbox.max_events": s.outbox.max_events,
        "outbox.max_bytes": s.outbox.max_bytes,
        "upstream.batch_max_events": s.upstream.batch_max_events,
        "upstream.batch_max_bytes": s.upstream.batch_max_bytes,
        "upstream.concurrency": s.upstream.concurrency,
        "upstream.timeout_s": s.upstream.timeout_s,
        "retry.initial_backoff_s": s.retry.initial_backoff_s,
        "retry.max_backoff_s": s.retry.max_backoff_s,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be greater than 0; got {value}")
    not_negative = {
        "outbox.dedupe_window_s": s.outbox.dedupe_window_s,
        "upstream.linger_ms": s.upstream.linger_ms,
        "oauth.refresh_leeway_s": s.oauth.refresh_leeway_s,
        "retry.max_attempts": s.retry.max_attempts,
        "retry.max_age_s": s.retry.max_age_s,
        "retry.refusing_grace_s": s.retry.refusing_grace_s,
    }
    for name, value in not_negative.items():
        if value < 0:
            raise ConfigError(f"{name} must not be negative; got {value}")
    for name, port in (("receiver.port", s.receiver.port), ("ops.port", s.ops.port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name} must be between 0 and 65535; got {port}")
    if s.retry.max_backoff_s < s.retry.initial_backoff_s:
        raise ConfigError("retry.max_backoff_s must not be smaller than retry.initial_backoff_s")
    short = [i for i, token in enumerate(s.receiver.tokens, 1) if len(token) < MIN_SENDER_TOKEN]
    if short:
        raise ConfigError(
            f"receiver.tokens: token {', '.join(map(str, short))} (counting from 1) is shorter "
            f"than {MIN_SENDER_TOKEN} characters; a sender token guards who may send, so make "
            "it long and random (`python3 -c 'import secrets; print(secrets.token_urlsafe(24))'`)"
        )
    if bool(s.receiver.tls_cert) != bool(s.receiver.tls_key):
        raise ConfigError("receiver.tls_cert and receiver.tls_key must be set together")
    if not is_loopback(s.receiver.host) and not s.receiver.tokens:
        raise ConfigError(
            f"receiver.host {s.receiver.host!r} is not a loopback address, so any machine on the "
            "network could send events: set receiver.tokens (bearer tokens apps must present)"
        )
    if s.oauth.token_url:
        if not s.oauth.client_id:
            raise ConfigError("oauth.client_id is required when oauth.token_url is set")
        if s.oauth.auth_method == "private_key_jwt":
            if not s.oauth.private_key_file:
                raise ConfigError("oauth.auth_method private_key_jwt needs oauth.private_key_file")
        elif not s.oauth.client_secret:
            raise ConfigError(
                "oauth.client_secret (or oauth.client_secret_file) is required when "
                "oauth.token_url is set"
            )


def require_upstream(s: Settings) -> None:
    """Raise ConfigError unless the settings can forward events (what `run` needs)."""
    if not s.upstream.endpoint:
        raise ConfigError(
            'upstream.endpoint is empty: set it, or upstream.preset (e.g. "timeback")'
        )
    if not s.upstream.endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"upstream.endpoint must be an http(s) URL; got {s.upstream.endpoint!r}")
    jobs = s.upstream.jobs_url
    if jobs and not (jobs.startswith(("http://", "https://")) and "{id}" in jobs):
        raise ConfigError(
            "upstream.jobs_url must be an http(s) URL with {id} where the job id goes; "
            f"got {jobs!r}"
        )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (and for `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redacted(s: Settings) -> dict[str, dict[str, Any]]:
    """The settings as plain data, with every secret replaced by a marker."""
    out = dataclasses.asdict(s)
    for section, key in SECRETS:
        value = out[section][key]
        if isinstance(value, tuple):
            out[section][key] = [REDACTED for _ in value]
        elif value:
            out[section][key] = REDACTED
    return out


def render_toml(data: Mapping[str, Mapping[str, Any]], origins: Origins | None = None) -> str:
    """Render two-level settings data as TOML (what `check-config` prints), each value that is
    not a built-in default followed by a comment saying where it came from."""
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            line = f"{key} = {_toml_value(value)}"
            origin = (origins or {}).get((section, key))
            lines.append(f"{line}  # {origin}" if origin else line)
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
