"""Settings: one immutable, typed object built at start-up from a TOML file, the environment and
secret files, then passed down. Every mistake is reported with the name of the key at fault.

Each section is a msgspec Struct: its types say what a key takes (`Literal` choices, `Meta`
bounds, unknown keys refused) and its description what the key means;
config/sidecar.example.toml is generated from them (`tools/reference.py`). What no type can say
(tokens long enough, TLS files in pairs, tokens on a non-loopback host) is checked after.

`[[destinations]]` (more places every event goes, beside [upstream]) is an array of tables, not
a section: each entry is a DestinationSettings whose keys depend on its kind, overridden from
the environment by name (`SIDECAR_DESTINATIONS_<NAME>_<KEY>`), its errors naming it by index
(`destinations[1].kind`).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
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


#: `concurrency` of [upstream] and of each destination
_Concurrency = Annotated[
    int,
    _key(
        "the most envelopes in flight at once: the ceiling of a limit that adapts to the "
        "platform's answers",
        gt=0,
    ),
]


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
    concurrency: _Concurrency = 4
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


class ReconcileSettings(_Section, frozen=True):
    """Proof at the destination: delivered events checked against what the platform holds
    (Beyond AI's `GET /caliper/events`), and the ones it lost sent again."""

    after_s: Annotated[
        float,
        _key(
            "0 = off. Else, this long after an event was delivered upstream (and confirmed, "
            "where the platform confirms), check that the platform holds it and send it again "
            "if it does not; its body is kept until then",
            ge=0,
        ),
    ] = 0
    give_up_s: Annotated[
        float,
        _key(
            "an event not seen at the platform after re-sends for this long is reported, not "
            "resent",
            gt=0,
        ),
    ] = 604800


class LogSettings(_Section, frozen=True):
    """Log verbosity and rendering."""

    level: Annotated[Literal["debug", "info", "warning", "error"], _key("")] = "info"
    format: Annotated[Literal["json", "console"], _key("")] = "json"


DestinationKind = Literal["caliper", "archive"]

#: what a destination's name may be (docs/operators.md): short and plain, since it names the
#: destination in metrics and in environment variables (`-` there becomes `_`)
DESTINATION_NAME: Final = re.compile(r"[a-z0-9-]{1,32}")
DESTINATION_NAME_RULE: Final = 'at most 32 characters of a-z 0-9 -, and not "upstream"'
#: the name the [upstream] destination goes by, which no entry of [[destinations]] may take
UPSTREAM: Final = "upstream"


class DestinationSettings(_Section, frozen=True):
    """One more place every event goes, beside [upstream] (an entry of `[[destinations]]`): any
    Caliper 1.2 endpoint (`kind = "caliper"`), or files on disk (`kind = "archive"`). Each kind
    takes its own keys (DESTINATION_KEYS); the other kind's are refused."""

    name: Annotated[
        str,
        _key(
            'names it in logs, metrics and SIDECAR_DESTINATIONS_<NAME>_<KEY> ("-" as "_"): '
            f"{DESTINATION_NAME_RULE}; unique"
        ),
    ]
    kind: Annotated[
        DestinationKind,
        _key(
            '"caliper": any Caliper 1.2 endpoint (envelopes, events unchanged); "archive": '
            "files on disk of what was accepted, for warehouses, replay and audits"
        ),
    ]
    endpoint: Annotated[str, _key("Caliper endpoint URL")] = ""
    bearer_token: Annotated[
        str,
        _key(
            'a static token (or bearer_token_file = "/run/secrets/district-lrs"); or instead '
            "a [destinations.oauth] table after the keys, with the keys of [oauth]"
        ),
    ] = ""
    oauth: OAuthSettings = msgspec.field(default_factory=OAuthSettings)
    sensor: Annotated[str, _key('envelope "sensor" IRI; default: upstream.sensor')] = ""
    batch_max_events: Annotated[int, _key("events per envelope", gt=0)] = 100
    batch_max_bytes: Annotated[int, _key("serialized envelope size", gt=0)] = 512_000
    linger_ms: Annotated[int, _key("how long a partial batch waits to fill", ge=0)] = 200
    concurrency: _Concurrency = 4
    timeout_s: Annotated[float, _key("per request to the endpoint or its token endpoint", gt=0)] = (
        30
    )
    when_full: Annotated[
        Literal["block", "dead_letter"],
        _key(
            '"block": events waiting for it count against the outbox limits (never lost); '
            '"dead_letter": when the outbox is full, events waiting only for this destination '
            "are dead-lettered for it (reason destination_lagging) so ingest goes on"
        ),
    ] = "block"
    dir: Annotated[
        str,
        _key(
            "where the files go, created if missing; a relative path is relative to this "
            "file's directory"
        ),
    ] = ""
    keep_days: Annotated[int, _key("0 = keep for ever", ge=0)] = 30

    def __post_init__(self) -> None:
        _mask(self, "bearer_token")


#: the keys each kind of destination takes besides `name` and `kind`, in the order check-config
#: prints them (`oauth`, a table, last)
DESTINATION_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "caliper": (
        "endpoint",
        "bearer_token",
        "sensor",
        "batch_max_events",
        "batch_max_bytes",
        "linger_ms",
        "concurrency",
        "timeout_s",
        "when_full",
        "oauth",
    ),
    "archive": ("dir", "keep_days"),
}

#: a destination's keys SIGHUP may change, as `key` or `oauth.key` (docs/operators.md): its
#: secrets and its tuning; any other key changed, or a destination added or removed, needs a
#: restart
DESTINATION_RELOADABLE: Final = frozenset(
    {
        "bearer_token",
        "oauth.client_secret",
        "oauth.private_key_file",
        "batch_max_events",
        "batch_max_bytes",
        "linger_ms",
        "concurrency",
        "timeout_s",
    }
)


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
    reconcile: ReconcileSettings = msgspec.field(default_factory=ReconcileSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    #: last: in the example file, commented `[[destinations]]` tables after every section
    destinations: tuple[DestinationSettings, ...] = ()

    def __repr__(self) -> str:
        # The default repr would print secrets into tracebacks and logs.
        return f"Settings({redacted(self)!r})"


#: the sections, each a table of keys (`[[destinations]]`, an array of tables, is none)
SECTIONS: Final[dict[str, type[_Section]]] = {
    f.name: f.type
    for f in msgspec.structs.fields(Settings)
    if isinstance(f.type, type) and issubclass(f.type, _Section)
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

#: a destination's keys whose values never leave the process, as `key` or `oauth.key`; each
#: can also be read from `<key>_file`
DESTINATION_SECRETS: Final = frozenset({"bearer_token", "oauth.client_secret"})

#: where each key's value came from: "file <path>", "environment <VAR>", "preset <name>"…; a
#: destination's keys under `destinations[<index>]` and `destinations[<index>].oauth`
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
    raw: dict[str, Any] = {}
    destinations: list[dict[str, Any]] = []
    if path is not None:
        raw = _read_toml(Path(path))
        if "destinations" in raw:
            destinations = _destinations_of(raw.pop("destinations"), Path(path), origins)

    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, table in raw.items():
        if section not in SECTIONS:
            known = ", ".join([*SECTIONS, "[destinations]"])
            hint = did_you_mean(section, [*SECTIONS, "destinations"])
            raise ConfigError(f"unknown section [{section}]{hint} (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in table.items():
            target = _target_key(section, key, f"{section}.{key}")
            values[section][key] = _convert(section, target, value, f"{section}.{key}")
            origins[(section, key)] = f"file {path}"

    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV or _service_link(var):
            continue
        if var.startswith(DESTINATIONS_ENV_PREFIX):
            _override_destination(destinations, var, text, origins)
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS or not key:
            raise ConfigError(f"unknown environment variable {var}")
        target = _target_key(section, key, var)
        value = _from_env(section, target, text)
        values[section][key] = _convert(section, target, value, var, lax=True)
        origins[(section, key)] = f"environment {var}"

    if path is not None:
        _relative_to_the_file(values, Path(path), origins)
    _resolve_secret_files(values, origins)
    _apply_preset(values, origins)
    if "tokens" in values["receiver"]:
        # A blank token is no token: it must neither be accepted nor count as protection.
        values["receiver"]["tokens"] = tuple(t for t in values["receiver"]["tokens"] if t.strip())
    # Every value was converted (and checked) as it was read: building needs no second pass,
    # which would also turn a SenderToken back into a plain string.
    sections: dict[str, Any] = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    for index, destination in enumerate(destinations):
        _resolve_destination_secret_files(destination, f"destinations[{index}]", origins)
        _default_sensor(destination, f"destinations[{index}]", sections["upstream"], origins)
    settings = Settings(**sections, destinations=tuple(map(_destination, destinations)))
    _check(settings)
    return settings


#: what Kubernetes injects for a Service named `sidecar` (docker's --link did the same): not
#: configuration, and no section of ours is called `port` or `service`
_SERVICE_LINK: Final = re.compile(r"SIDECAR_(PORT|SERVICE_[A-Z0-9_]+|PORT_\d+_(TCP|UDP|SCTP)\w*)")


def _service_link(var: str) -> bool:
    return _SERVICE_LINK.fullmatch(var) is not None


def _read_toml(path: Path) -> dict[str, Any]:
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
    return _types_of(SECTIONS[section])


def _types_of(cls: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(cls)}


#: the keys that name files, as (section, key)
PATH_KEYS: Final = frozenset(
    {
        ("outbox", "path"),
        ("receiver", "tls_cert"),
        ("receiver", "tls_key"),
        ("oauth", "private_key_file"),
        *((section, f"{key}_file") for section, key in SECRETS),
    }
)


def _relative_to_the_file(values: dict[str, dict[str, Any]], path: Path, origins: Origins) -> None:
    """Relative paths written in the configuration file are relative to its directory, so
    that any command given `-c` finds the same files from anywhere; so is the default outbox
    (`data/outbox.db`) of a configuration given by file. A value from the environment stays
    relative to the working directory, as a shell would take it."""
    base = path.absolute().parent
    for section, key in PATH_KEYS:
        value = values[section].get(key)
        if key not in values[section] and (section, key) == ("outbox", "path"):
            value = OutboxSettings().path
        elif not origins.get((section, key), "").startswith("file "):
            continue
        if isinstance(value, str) and value and not Path(value).is_absolute():
            values[section][key] = str(base / value)


def _target_key(section: str, key: str, where: str) -> str:
    """The settings field a key sets: itself, or the secret behind a `<secret>_file` key."""
    if key in _types(section):
        return key
    if key.endswith("_file") and (section, key.removesuffix("_file")) in SECRETS:
        return key
    known = [*_types(section), *(f"{k}_file" for s, k in SECRETS if s == section)]
    raise ConfigError(f"unknown key {where}{did_you_mean(key, known)}")


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`; did you mean X?` for the closest of `known` to a mistyped word, or nothing."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


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
    return _convert_to(_types(section).get(key, str), value, where, lax)


def _convert_to(kind: Any, value: Any, where: str, lax: bool = False) -> Any:
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
        _read_secret_file(values[section], section, key, origins, _PROTECTIONS.get((section, key)))


def _read_secret_file(
    table: dict[str, Any], section: str, key: str, origins: Origins, protection: str | None
) -> None:
    """Set `key` of a table from the file its `<key>_file` names, if any. `protection`: what
    running without the secret means, when a file holding none must be an error."""
    file_key = f"{key}_file"
    file_name = table.pop(file_key, "")
    origin = origins.pop((section, file_key), "")
    if not file_name:
        return
    origins[(section, key)] = f"{origin}, secret file {file_name}".lstrip(", ")
    if table.get(key):
        raise ConfigError(f"set {section}.{key} or {section}.{file_key}, not both")
    try:
        data = Path(file_name).read_bytes()
    except OSError as e:
        raise ConfigError(f"{section}.{file_key}: cannot read {file_name}: {e.strerror}") from None
    where = f"{section}.{file_key} {file_name}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # Named by its line, never shown: the bytes around it may be a token.
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{where}, line {line}: not UTF-8 text (saved in another encoding?); secrets "
            "files are UTF-8"
        ) from None
    value: str | tuple[SenderToken, ...] = (
        tokens_of(text, where) if key == "tokens" else text.strip()
    )
    if protection is not None and not value:
        # Read while it is being rewritten, or left empty by mistake: either way, taking it
        # as "no token" would switch a protection off without anyone deciding to.
        raise ConfigError(
            f"{where} holds no token: fill it, or remove {section}.{file_key} to run "
            f"without {protection}"
        )
    table[key] = value


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


# -- [[destinations]] ---------------------------------------------------------------------------

DESTINATIONS_ENV_PREFIX: Final = f"{ENV_PREFIX}DESTINATIONS_"
#: the keys of a destination that are values (`oauth` is a table; `name` and `kind` are read first)
_DESTINATION_VALUES: Final = {
    key: kind
    for key, kind in _types_of(DestinationSettings).items()
    if key not in ("name", "kind", "oauth")
}
_OAUTH_VALUES: Final = _types_of(OAuthSettings)


def destination_env_prefix(name: str) -> str:
    """What the environment variables overriding a destination's keys start with, the key
    following in upper case: `SIDECAR_DESTINATIONS_DISTRICT_LRS_` for `district-lrs`."""
    return f"{DESTINATIONS_ENV_PREFIX}{name.upper().replace('-', '_')}_"


def _destinations_of(raw: Any, path: Path, origins: Origins) -> list[dict[str, Any]]:
    """The file's `[[destinations]]` tables, each key converted and checked against the
    destination's kind, a relative `dir` made relative to the file's directory."""
    if not isinstance(raw, list) or not all(isinstance(table, dict) for table in raw):
        raise ConfigError("destinations must be an array of tables: [[destinations]]")
    origin = f"file {path}"
    destinations: list[dict[str, Any]] = []
    for index, table in enumerate(raw):
        where = f"destinations[{index}]"
        name, kind = _identity(table, where, destinations)
        destination: dict[str, Any] = {"name": name, "kind": kind}
        origins[(where, "name")] = origins[(where, "kind")] = origin
        for key, value in table.items():
            if key in ("name", "kind"):
                continue
            if key != "oauth":
                _set_destination_value(destination, key, value, f"{where}.{key}")
                origins[(where, key)] = origin
                continue
            _of_kind(destination, key, f"{where}.{key}")
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.oauth must be a table: [destinations.oauth]")
            for oauth_key, oauth_value in value.items():
                label = f"{where}.oauth.{oauth_key}"
                _set_oauth_value(destination, oauth_key, oauth_value, label)
                origins[(f"{where}.oauth", oauth_key)] = origin
        for key in ("dir", "bearer_token_file"):
            # Relative to the file, as the file's other paths (_relative_to_the_file).
            if destination.get(key):
                destination[key] = str(path.absolute().parent / destination[key])
        for key in ("client_secret_file", "private_key_file"):
            if destination.get("oauth", {}).get(key):
                oauth = destination["oauth"]
                oauth[key] = str(path.absolute().parent / oauth[key])
        destinations.append(destination)
    return destinations


def _identity(
    table: dict[str, Any], where: str, earlier: list[dict[str, Any]]
) -> tuple[str, DestinationKind]:
    """A destination's name and kind, read before its other keys (which depend on the kind)."""
    if "name" not in table:
        raise ConfigError(f"{where}.name is required ({DESTINATION_NAME_RULE})")
    if "kind" not in table:
        raise ConfigError(f'{where}.kind is required ("caliper" or "archive")')
    types = _types_of(DestinationSettings)
    name: str = _convert_to(types["name"], table["name"], f"{where}.name")
    if name == UPSTREAM:
        raise ConfigError(f'{where}.name: "upstream" is the [upstream] destination; choose another')
    if DESTINATION_NAME.fullmatch(name) is None:
        raise ConfigError(
            f"{where}.name {name!r} is not a destination name: {DESTINATION_NAME_RULE}"
        )
    for index, other in enumerate(earlier):
        if other["name"] == name:
            raise ConfigError(
                f"{where}.name {name!r} is already the name of destinations[{index}]: names "
                "are unique"
            )
    kind: DestinationKind = _convert_to(types["kind"], table["kind"], f"{where}.kind")
    return name, kind


def _set_destination_value(
    destination: dict[str, Any], key: str, value: Any, label: str, lax: bool = False
) -> None:
    """Set a key of a destination (a value, or a `<secret>_file`); ConfigError naming `label`
    (the key, or the environment variable) when no destination has it, or not this kind."""
    kind = _DESTINATION_VALUES.get(key)
    if kind is None and key.removesuffix("_file") not in DESTINATION_SECRETS:
        hint = did_you_mean(key, [*_DESTINATION_VALUES, "bearer_token_file"])
        raise ConfigError(f"unknown key {label}{hint}")
    _of_kind(destination, key.removesuffix("_file"), label)
    destination[key] = _convert_to(kind or str, value, label, lax)


def _set_oauth_value(
    destination: dict[str, Any], key: str, value: Any, label: str, lax: bool = False
) -> None:
    """Set a key of a destination's [destinations.oauth] table, shaped as [oauth]."""
    kind = _OAUTH_VALUES.get(key)
    if kind is None and key != "client_secret_file":
        hint = did_you_mean(key, [*_OAUTH_VALUES, "client_secret_file"])
        raise ConfigError(f"unknown key {label}{hint}")
    destination.setdefault("oauth", {})[key] = _convert_to(kind or str, value, label, lax)


def _of_kind(destination: dict[str, Any], key: str, label: str) -> None:
    """ConfigError naming `label` unless the destination's kind takes `key`."""
    kind = destination["kind"]
    if key not in DESTINATION_KEYS[kind]:
        others = " or ".join(k for k, keys in DESTINATION_KEYS.items() if key in keys)
        raise ConfigError(
            f"{label}: {_a(kind)} destination ({destination['name']}) takes no {key}; it is a "
            f"key of {others} destinations"
        )


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _override_destination(
    destinations: list[dict[str, Any]], var: str, text: str, origins: Origins
) -> None:
    """Apply `SIDECAR_DESTINATIONS_<NAME>_<KEY>` (`<KEY>` is `OAUTH_<KEY>` for a key of the
    destination's oauth table) to the destination the file defines with that name."""
    found = [
        (index, var.removeprefix(destination_env_prefix(d["name"])).lower())
        for index, d in enumerate(destinations)
        if var.startswith(destination_env_prefix(d["name"]))
    ]
    if not found:
        defined = ", ".join(d["name"] for d in destinations) or "none"
        raise ConfigError(
            f"{var} names no destination of the configuration file (defined there: "
            f"{defined}); the environment overrides keys of destinations, it does not add any"
        )
    # "lrs" and "lrs-oauth" both prefix SIDECAR_DESTINATIONS_LRS_OAUTH_SCOPE: take the one for
    # which the rest is a key; the longest name when none is.
    known = [(index, key) for index, key in found if _is_destination_key(key)]
    if len(known) > 1:
        names = " and ".join(destinations[index]["name"] for index, _ in known)
        raise ConfigError(f"{var} could be a key of {names}: rename one of them")
    index, key = (known or sorted(found, key=lambda f: len(f[1])))[0]
    destination, where = destinations[index], f"destinations[{index}]"
    if key in ("name", "kind"):
        raise ConfigError(f"{var}: a destination's {key} is set in the file only")
    if key.startswith("oauth_"):
        _of_kind(destination, "oauth", var)
        _set_oauth_value(destination, key.removeprefix("oauth_"), text, var, lax=True)
        origins[(f"{where}.oauth", key.removeprefix("oauth_"))] = f"environment {var}"
        return
    _set_destination_value(destination, key, text, var, lax=True)
    if key == "dir" and destination["dir"]:
        # Not in the file: relative to the working directory, as a shell would take it.
        destination["dir"] = str(Path(destination["dir"]).absolute())
    origins[(where, key)] = f"environment {var}"


def _is_destination_key(key: str) -> bool:
    if key.startswith("oauth_"):
        key = key.removeprefix("oauth_")
        return key in _OAUTH_VALUES or key == "client_secret_file"
    return key in _DESTINATION_VALUES or key.removesuffix("_file") in DESTINATION_SECRETS


def _resolve_destination_secret_files(
    destination: dict[str, Any], where: str, origins: Origins
) -> None:
    _read_secret_file(destination, where, "bearer_token", origins, "a bearer token toward it")
    if "oauth" in destination:
        _read_secret_file(destination["oauth"], f"{where}.oauth", "client_secret", origins, None)


def _default_sensor(
    destination: dict[str, Any], where: str, upstream: UpstreamSettings, origins: Origins
) -> None:
    """A caliper destination's sensor, when none is set: upstream.sensor."""
    if destination["kind"] == "caliper" and not destination.get("sensor") and upstream.sensor:
        destination["sensor"] = upstream.sensor
        origins[(where, "sensor")] = "upstream.sensor"


def _destination(values: dict[str, Any]) -> DestinationSettings:
    values = dict(values)
    oauth = values.pop("oauth", None)
    if oauth is None:
        return DestinationSettings(**values)
    return DestinationSettings(**values, oauth=OAuthSettings(**oauth))


def _check_destinations(s: Settings) -> None:
    archives: dict[str, int] = {}
    for index, d in enumerate(s.destinations):
        where = f"destinations[{index}]"
        if d.kind == "archive":
            if not d.dir:
                raise ConfigError(f"{where}.dir is required: {d.name!r} is an archive destination")
            if d.dir in archives:
                raise ConfigError(
                    f"{where}.dir is also destinations[{archives[d.dir]}].dir: two archives "
                    "cannot share a directory"
                )
            archives[d.dir] = index
            continue
        if not d.endpoint:
            raise ConfigError(f"{where}.endpoint is required: {d.name!r} is a caliper destination")
        if not d.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.endpoint must be an http(s) URL; got {d.endpoint!r}")
        if d.bearer_token and d.oauth.token_url:
            raise ConfigError(
                f"set {where}.bearer_token or {where}.oauth.token_url, not both (one way to "
                "authenticate)"
            )
        _check_oauth(d.oauth, f"{where}.oauth")


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
    _check_oauth(s.oauth, "oauth")
    _check_destinations(s)


def _check_oauth(o: OAuthSettings, table: str) -> None:
    """What an OAuth table needs once it names a token URL (`table`: its name in messages)."""
    if not o.token_url:
        return
    if not o.client_id:
        raise ConfigError(f"{table}.client_id is required when {table}.token_url is set")
    if o.auth_method == "private_key_jwt":
        if not o.private_key_file:
            raise ConfigError(f"{table}.auth_method private_key_jwt needs {table}.private_key_file")
    elif not o.client_secret:
        raise ConfigError(
            f"{table}.client_secret (or {table}.client_secret_file) is required when "
            f"{table}.token_url is set"
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


def redacted(s: Settings) -> dict[str, Any]:
    """The settings as plain data, with every secret replaced by a marker: each section a
    table, `destinations` a list of them (each with the keys of its kind)."""
    out: dict[str, Any] = {
        name: dict(msgspec.structs.asdict(getattr(s, name))) for name in SECTIONS
    }
    for section, key in SECRETS:
        value = out[section][key]
        if isinstance(value, tuple):
            out[section][key] = [REDACTED for _ in value]
        elif value:
            out[section][key] = REDACTED
    out["destinations"] = [_redacted_destination(d) for d in s.destinations]
    return out


def _redacted_destination(d: DestinationSettings) -> dict[str, Any]:
    out: dict[str, Any] = {"name": d.name, "kind": d.kind}
    for key in DESTINATION_KEYS[d.kind]:
        out[key] = getattr(d, key)
    if d.bearer_token:
        out["bearer_token"] = REDACTED
    if "oauth" in out:
        if d.oauth == OAuthSettings():
            del out["oauth"]  # none written: printed, it would read as OAuth in use
        else:
            out["oauth"] = dict(msgspec.structs.asdict(d.oauth))
            if d.oauth.client_secret:
                out["oauth"]["client_secret"] = REDACTED
    return out


def is_secret(table: str, key: str) -> bool:
    """True for a key whose value never leaves the process, named as in Origins: `("oauth",
    "client_secret")`, `("destinations[0].oauth", "client_secret")`…"""
    if (table, key) in SECRETS:
        return True
    of_destination = re.fullmatch(r"destinations\[\d+\](\.oauth)?", table)
    if of_destination is None:
        return False
    return ("oauth." if of_destination[1] else "") + key in DESTINATION_SECRETS


#: said above what check-config prints of `[[destinations]]`
_DESTINATIONS_RESTART: Final = (
    "# a destination added or removed, or its endpoint, sensor, dir or OAuth client changed, "
    "needs a restart; its secrets and tuning a SIGHUP applies (docs/operators.md)"
)


def render_toml(data: Mapping[str, Any], origins: Origins | None = None) -> str:
    """Render settings data as TOML (what `check-config` prints): sections as tables, lists of
    them as arrays of tables, each value that is not a built-in default followed by a comment
    saying where it came from."""
    lines: list[str] = []
    for section, table in data.items():
        if not isinstance(table, list):
            _render_table(lines, f"[{section}]", section, section, table, origins or {})
            continue
        if table and section == "destinations":
            lines.append(_DESTINATIONS_RESTART)
        for index, item in enumerate(table):
            where = f"{section}[{index}]"
            _render_table(lines, f"[[{section}]]", section, where, item, origins or {})
    return "\n".join(lines)


def _render_table(
    lines: list[str],
    header: str,
    path: str,
    where: str,
    table: Mapping[str, Any],
    origins: Origins,
) -> None:
    """One table's lines, then its sub-tables' (`path`: its TOML name; `where`: its name in
    origins)."""
    lines.append(header)
    for key, value in table.items():
        if isinstance(value, Mapping):
            continue
        line = f"{key} = {toml_value(value)}"
        origin = origins.get((where, key))
        lines.append(f"{line}  # {origin}" if origin else line)
    lines.append("")
    for key, value in table.items():
        if isinstance(value, Mapping):
            _render_table(
                lines, f"[{path}.{key}]", f"{path}.{key}", f"{where}.{key}", value, origins
            )


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
