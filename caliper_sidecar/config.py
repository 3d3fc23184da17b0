"""Settings: one immutable, typed object built at start-up from a TOML file, the environment and
secret files, then passed down. Every mistake is reported with the name of the key at fault.

Each section is a msgspec Struct: its types say what a key takes (`Literal` choices, `Meta`
bounds, unknown keys refused) and its description what the key means;
config/sidecar.example.toml is generated from them (`tools/reference.py`). What no type can say
(tokens long enough, TLS files in pairs, tokens on a non-loopback host) is checked after.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, cast, get_args, get_origin

import msgspec

from caliper_sidecar.exceptions import ConfigError
from caliper_sidecar.presets import PRESETS, Platform, Profile

ENV_PREFIX: Final = "SIDECAR_"
CONFIG_ENV: Final = "SIDECAR_CONFIG"
REDACTED: Final = "<redacted>"
#: the shortest sender token accepted (docs/operators.md): 16 random characters are ~96 bits
MIN_SENDER_TOKEN: Final = 16
#: what a sender token's label may be (docs/operators.md): short and plain, since logs, metrics
#: and journeys publish it; a secret glued onto a label by a lost newline breaks this rule
SENDER_LABEL: Final = re.compile(r"[A-Za-z0-9._:-]{1,32}")
SENDER_LABEL_RULE: Final = "at most 32 characters of A-Z a-z 0-9 . _ : -"
#: what most likely made a tokens file line that is no line, and how not to again
_GLUED_HINT: Final = (
    "did a line lose its final newline before another was appended? Use "
    "`caliper-sidecar token new --append FILE`"
)


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


def _mask(section: msgspec.Struct, *keys: str) -> None:
    """Wrap a frozen section's secret fields in Secret (tests and code may pass plain str)."""
    for key in keys:
        value = getattr(section, key)
        masked = tuple(_secret(v) for v in value) if isinstance(value, tuple) else _secret(value)
        msgspec.structs.force_setattr(section, key, masked)


def _secret(value: str) -> Secret:
    return value if isinstance(value, Secret) else Secret(value)


def _key(description: str, **bounds: float) -> msgspec.Meta:
    """A key's meaning (config/sidecar.example.toml is generated from it) and bounds."""
    meta: Any = msgspec.Meta  # its overloads take each pair of bounds by name
    return cast(msgspec.Meta, meta(description=description, **bounds))


#: how every section is typed: frozen, and a key it does not have is an error
class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


Strings = tuple[str, ...]


class ReceiverSettings(_Section, frozen=True):
    """Where and how apps send events to the sidecar."""

    host: Annotated[str, _key('a non-loopback host (e.g. "0.0.0.0") requires tokens')] = "127.0.0.1"
    port: Annotated[int, _key("", ge=0, le=65535)] = 8787
    max_body_bytes: Annotated[int, _key("larger bodies (after gzip decompression): 413", gt=0)] = (
        1_048_576
    )
    max_events_per_request: Annotated[int, _key("more events in one request: 413", gt=0)] = 1000
    tokens: Annotated[
        Strings,
        _key(
            "bearer tokens apps must present (each at least 16 characters); empty: no "
            "authentication. Or tokens_file: one a line, optionally after a label and a space "
            '("room-12 3f9c…"), the label naming the sender in logs, metrics and journeys: '
            f"{SENDER_LABEL_RULE}; `caliper-sidecar token new --label L --append FILE` adds a "
            "line"
        ),
    ] = ()
    cors_origins: Annotated[
        Strings,
        _key(
            'web origins allowed to send from a browser, e.g. ["https://app.example"]; admin '
            "requests from any other origin: 403"
        ),
    ] = ()
    server_names: Annotated[
        Strings,
        _key(
            "host names the sidecar is reached by besides IP literals and localhost, e.g. "
            '["relay.local"]; a request without a token naming another Host is refused (421): '
            "a DNS-rebinding page reads nothing"
        ),
    ] = ()
    tls_cert: Annotated[str, _key("PEM certificate chain, for TLS in relay mode")] = ""
    tls_key: Annotated[str, _key("PEM private key of that certificate")] = ""

    def __post_init__(self) -> None:
        _mask(self, "tokens")


class OutboxSettings(_Section, frozen=True):
    """The durable queue between the receiver and the dispatcher: one SQLite file (`path`, the
    embedded default), or a PostgreSQL database shared by replicas (`url`)."""

    path: Annotated[str, _key("created owner-only (0600); one `run` process per file")] = (
        "data/outbox.db"
    )
    url: Annotated[
        str,
        _key(
            '"postgresql://user@host/db": a PostgreSQL outbox shared by several `run` replicas '
            "(or url_file, for a password); empty: the SQLite file at `path`"
        ),
    ] = ""
    synchronous: Annotated[
        Literal["full", "normal"],
        _key('"full": survives power loss; "normal": survives process crashes'),
    ] = "full"
    max_events: Annotated[int, _key("when full: 503 + Retry-After, never a silent drop", gt=0)] = (
        1_000_000
    )
    max_bytes: Annotated[int, _key("bytes of waiting events, same rule", gt=0)] = 1_073_741_824
    dedupe_window_s: Annotated[
        float, _key("ids delivered this recently still count as duplicates", ge=0)
    ] = 86_400

    def __post_init__(self) -> None:
        _mask(self, "url")  # it may hold the database's password


class UpstreamSettings(_Section, frozen=True):
    """The Caliper endpoint events are forwarded to, and how envelopes are batched."""

    preset: Annotated[
        str,
        _key(
            'LearnWith.AI: "timeback", "timeback-staging", "timeback-sandbox"; Beyond AI: '
            '"timeback-beyond", "timeback-beyond-staging". Fills platform, endpoint, jobs_url, '
            "the oauth keys and validation.profile"
        ),
    ] = ""
    platform: Annotated[
        Platform,
        _key(
            '"learnwith-ai", "beyond-ai" or "caliper" (any Caliper endpoint): the form events '
            "leave in; never guessed from the URL"
        ),
    ] = "caliper"
    endpoint: Annotated[str, _key("Caliper endpoint URL")] = ""
    sensor: Annotated[
        str, _key('envelope "sensor" IRI; default urn:caliper-sidecar:<hostname>')
    ] = ""
    batch_max_events: Annotated[int, _key("events per envelope", gt=0)] = 100
    batch_max_bytes: Annotated[
        int, _key("serialized envelope size; a larger single event is refused (413)", gt=0)
    ] = 512_000
    linger_ms: Annotated[int, _key("how long a partial batch waits to fill", ge=0)] = 200
    concurrency: Annotated[int, _key("envelopes in flight at once", gt=0)] = 4
    timeout_s: Annotated[float, _key("per request to the platform or the token endpoint", gt=0)] = (
        30
    )
    bearer_token: Annotated[
        str, _key("a static token instead of OAuth (when oauth.token_url is empty)")
    ] = ""
    jobs_url: Annotated[
        str,
        _key(
            'e.g. "https://caliper.alpha-1edtech.ai/jobs/{id}/status": follow the platform\'s '
            "processing jobs until they confirm the events"
        ),
    ] = ""

    def __post_init__(self) -> None:
        _mask(self, "bearer_token")


class OAuthSettings(_Section, frozen=True):
    """OAuth2 client credentials for the upstream; no token_url means no token is fetched."""

    token_url: Annotated[str, _key("empty: no token is fetched (see upstream.bearer_token)")] = ""
    client_id: Annotated[str, _key("")] = ""
    client_secret: Annotated[str, _key('or client_secret_file = "/run/secrets/timeback"')] = ""
    scope: Annotated[str, _key("")] = ""
    auth_method: Annotated[
        Literal["client_secret_basic", "client_secret_post", "private_key_jwt"], _key("")
    ] = "client_secret_basic"
    private_key_file: Annotated[str, _key("PEM key, for private_key_jwt")] = ""
    refresh_leeway_s: Annotated[
        float, _key("refresh this long before expiry (at most half a token's life)", ge=0)
    ] = 60

    def __post_init__(self) -> None:
        _mask(self, "client_secret")


class RetrySettings(_Section, frozen=True):
    """How failed deliveries are retried, and when they give up."""

    initial_backoff_s: Annotated[float, _key("", gt=0)] = 1.0
    max_backoff_s: Annotated[float, _key("", gt=0)] = 300.0
    max_attempts: Annotated[
        int, _key("0 = no limit; else dead-letter after this many failed attempts", ge=0)
    ] = 0
    max_age_s: Annotated[
        float,
        _key(
            "0 = no limit; else dead-letter events that waited this long, counted on a clock "
            "that wall-clock steps cannot move",
            ge=0,
        ),
    ] = 0
    refusing_grace_s: Annotated[
        float,
        _key(
            "a refusal every event gets is the platform's failure: events stay queued this "
            "long before they are dead-lettered for it",
            ge=0,
        ),
    ] = 3600


class ValidationSettings(_Section, frozen=True):
    """How strictly incoming events are checked."""

    mode: Annotated[
        Literal["strict", "warn", "off"],
        _key('"strict": reject invalid (422); "warn": accept and log; "off"'),
    ] = "strict"
    profile: Annotated[
        Profile,
        _key(
            '"timeback": what TimeBack\'s platforms accept (Caliper 1.2, its additions, and the '
            "SDK's TimebackProfile events); \"timeback-learnwith\": plus LearnWith.AI's identity "
            'rules (urn:uuid actor and edApp); "caliper": Caliper 1.2 only'
        ),
    ] = "timeback"


class OpsSettings(_Section, frozen=True):
    """Where operators' routes (health, readiness, metrics, status, dead letters) listen.

    `port = 0`: on the receiver's own listener. Otherwise a listener of their own, plain HTTP
    on `host` (loopback by default), whatever TLS and tokens the receiver has.
    """

    host: Annotated[
        str,
        _key("operators' routes: /healthz, /readyz, /metrics, /v1/status, the dead-letter routes"),
    ] = "127.0.0.1"
    port: Annotated[
        int,
        _key(
            "0: on the receiver's listener; else a plain HTTP listener of their own (what the "
            "image's HEALTHCHECK uses)",
            ge=0,
            le=65535,
        ),
    ] = 0


class AdminSettings(_Section, frozen=True):
    """Access to the dead-letter endpoints."""

    token: Annotated[
        str, _key("admin endpoints need it; without it they answer on loopback only")
    ] = ""

    def __post_init__(self) -> None:
        _mask(self, "token")


class LogSettings(_Section, frozen=True):
    """Log verbosity and rendering."""

    level: Annotated[Literal["debug", "info", "warning", "error"], _key("")] = "info"
    format: Annotated[Literal["json", "console"], _key("")] = "json"


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration of one sidecar."""

    receiver: ReceiverSettings = msgspec.field(default_factory=ReceiverSettings)
    outbox: OutboxSettings = msgspec.field(default_factory=OutboxSettings)
    upstream: UpstreamSettings = msgspec.field(default_factory=UpstreamSettings)
    oauth: OAuthSettings = msgspec.field(default_factory=OAuthSettings)
    retry: RetrySettings = msgspec.field(default_factory=RetrySettings)
    validation: ValidationSettings = msgspec.field(default_factory=ValidationSettings)
    ops: OpsSettings = msgspec.field(default_factory=OpsSettings)
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)

    def __repr__(self) -> str:
        # The default repr would print secrets into tracebacks and logs.
        return f"Settings({redacted(self)!r})"


SECTIONS: Final[dict[str, type[_Section]]] = {
    f.name: f.type for f in msgspec.structs.fields(Settings)
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
            values[section][key] = _convert(section, target, value, f"{section}.{key}")
            origins[(section, key)] = f"file {path}"

    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV or _service_link(var):
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(f"unknown environment variable {var}")
        target = _target_key(section, key, var)
        value = _from_env(section, target, text)
        values[section][key] = _convert(section, target, value, var, lax=True)
        origins[(section, key)] = f"environment {var}"

    _resolve_secret_files(values, origins)
    _apply_preset(values, origins)
    if "tokens" in values["receiver"]:
        # A blank token is no token: it must neither be accepted nor count as protection.
        values["receiver"]["tokens"] = tuple(t for t in values["receiver"]["tokens"] if t.strip())
    # Every value was converted (and checked) as it was read: building needs no second pass,
    # which would also turn a SenderToken back into a plain string.
    sections: dict[str, Any] = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    settings = Settings(**sections)
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


def _types(section: str) -> dict[str, Any]:
    """The type of each key of a section (bounds and choices included)."""
    return {f.name: f.type for f in msgspec.structs.fields(SECTIONS[section])}


def _target_key(section: str, key: str, where: str) -> str:
    """The settings field a key sets: itself, or the secret behind a `<secret>_file` key."""
    if key in _types(section):
        return key
    if key.endswith("_file") and (section, key.removesuffix("_file")) in SECRETS:
        return key
    raise ConfigError(f"unknown key {where}")


def _from_env(section: str, key: str, text: str) -> Any:
    """An environment variable's text as the TOML value it stands for: a list is
    comma-separated; numbers are converted with the key's type."""
    if _unwrap(_types(section).get(key)) == Strings:
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def _unwrap(kind: Any) -> Any:
    return get_args(kind)[0] if get_origin(kind) is Annotated else kind


def _convert(section: str, key: str, value: Any, where: str, lax: bool = False) -> Any:
    """A value converted to its key's type, its bounds and choices checked; ConfigError names
    `where` (the key, or the environment variable) and says what was expected."""
    kind = _types(section).get(key, str)  # a `<secret>_file` key is a path
    try:
        # Strict for TOML's own types (no "80" for a port, no true for a number); lax for the
        # environment's strings, which stand for numbers.
        return msgspec.convert(value, type=kind, strict=not lax)
    except msgspec.ValidationError:
        raise ConfigError(f"{where} {_expected(kind, value, lax)}") from None


def _expected(kind: Any, value: Any, lax: bool) -> str:
    """What a value of this type must be, in words, for an error message."""
    info = msgspec.inspect.type_info(kind)
    if isinstance(info, msgspec.inspect.Metadata):  # a key's description
        info = info.type
    if isinstance(info, msgspec.inspect.LiteralType):
        # In the order written (the inspected values are sorted).
        return f"must be one of {', '.join(get_args(_unwrap(kind)))}; got {value!r}"
    if isinstance(info, msgspec.inspect.VarTupleType):
        return "must be an array of strings"
    if isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        noun = "an integer" if isinstance(info, msgspec.inspect.IntType) else "a number"
        if isinstance(value, bool):
            return f"must be {noun}, not a boolean"
        # A string is a number only where it stands for one: in the environment.
        number = _number(value) if lax or not isinstance(value, str) else None
        if number is None:
            got = repr(value) if lax else type(value).__name__
            return f"must be {noun}, got {got}"
        if info.ge is not None and info.le is not None:
            return f"must be between {info.ge} and {info.le}; got {number}"
        if info.gt == 0:
            return f"must be greater than 0; got {number}"
        if info.ge == 0:
            return f"must not be negative; got {number}"
        return f"must be {noun}; got {value!r}"
    return f"must be a string, got {type(value).__name__}"


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            continue
    return None


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
        where = f"{section}.{file_key} {file_name}"
        value: str | tuple[SenderToken, ...] = (
            tokens_of(text, where) if key == "tokens" else text.strip()
        )
        if (section, key) in _PROTECTIONS and not value:
            # Read while it is being rewritten, or left empty by mistake: either way, taking it
            # as "no token" would switch a protection off without anyone deciding to.
            raise ConfigError(
                f"{where} holds no token: fill it, or remove {section}.{file_key} to run "
                f"without {_PROTECTIONS[(section, key)]}"
            )
        values[section][key] = value


#: secret files that switch a protection on, and what running without them means
_PROTECTIONS: Final = {
    ("receiver", "tokens"): "sender tokens (any app may then send)",
    ("admin", "token"): "an admin token (the admin routes then answer on loopback only)",
}


def tokens_of(text: str, where: str) -> tuple[SenderToken, ...]:
    """The tokens of a tokens file: one a line, optionally after a label and a space
    (`room-12 3f9c…`, as `caliper-sidecar token new --label room-12` prints it).

    Raises ConfigError naming `where` and the line; never with the line's text, which may
    hold a token (a label with a token glued onto it is the mistake most likely here).
    """
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if len(fields) > 2:
            raise ConfigError(
                f"{where}, line {number}: a line is a token, or a label, a space and a token; "
                f"{_GLUED_HINT}"
            )
        if len(fields) == 2 and not is_sender_label(fields[0]):
            raise ConfigError(
                f"{where}, line {number}: the label ({len(fields[0])} characters) is not a "
                f"label ({SENDER_LABEL_RULE}); {_GLUED_HINT}"
            )
        if fields:
            tokens.append(SenderToken(fields[-1], fields[0] if len(fields) == 2 else None))
    return tuple(tokens)


def is_sender_label(label: str) -> bool:
    """True when `label` may name a sender token (SENDER_LABEL_RULE)."""
    return SENDER_LABEL.fullmatch(label) is not None


def _apply_preset(values: dict[str, dict[str, Any]], origins: Origins) -> None:
    name = values["upstream"].get("preset", "")
    if not name:
        return
    if name not in PRESETS:
        raise ConfigError(f"upstream.preset {name!r} is unknown (known: {', '.join(PRESETS)})")
    for (section, key), value in PRESETS[name].items():
        if key not in values[section]:
            values[section][key] = _convert(section, key, value, f"preset {name}: {section}.{key}")
            origins[(section, key)] = f"preset {name}"


def _check(s: Settings) -> None:
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
    out = {name: dict(msgspec.structs.asdict(getattr(s, name))) for name in SECTIONS}
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
            line = f"{key} = {toml_value(value)}"
            origin = (origins or {}).get((section, key))
            lines.append(f"{line}  # {origin}" if origin else line)
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
