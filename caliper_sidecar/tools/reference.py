"""Files generated from the code, so that they cannot drift from it (a test regenerates each
and compares):

- config/sidecar.example.toml: every key of every section, its default and its meaning, from
  the settings' types (config.py), and commented `[[destinations]]` of each kind;
- docs/openapi.json: the HTTP API, whose answer bodies come from http/bodies.py;
- the Helm chart's values.schema.json: its `Settings` definitions (what `config` may hold),
  from the same types, less the keys the chart sets itself or takes only by reference.

    python -m caliper_sidecar.tools.reference      # writes all three
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Final, get_args

import msgspec

from caliper_sidecar.config import (
    DESTINATION_KEYS,
    DESTINATION_SECRETS,
    SECRETS,
    SECTIONS,
    DestinationSettings,
    Settings,
    toml_value,
)
from caliper_sidecar.http import openapi

ROOT: Final = Path(__file__).resolve().parents[2]
EXAMPLE: Final = Path("config/sidecar.example.toml")
OPENAPI: Final = Path("docs/openapi.json")
HELM_SCHEMA: Final = Path("deploy/helm/caliper-sidecar/values.schema.json")
#: keys the chart sets itself (the listeners' hosts, the relay's outbox, the TLS files): a
#: value for one in the chart's `config` would be overridden, so the schema refuses it
_CHART_KEYS: Final = {
    ("receiver", "host"),
    ("receiver", "tls_cert"),
    ("receiver", "tls_key"),
    ("ops", "host"),
    ("outbox", "path"),
}
#: where a key's comment starts, and the widest line
_COMMENT_AT: Final = 30
_WIDTH: Final = 96

_HEADER: Final = """\
# caliper-sidecar configuration: every key, with its default.
# (Generated from the settings' types in caliper_sidecar/config.py by
# `python -m caliper_sidecar.tools.reference`: edit those, not this file.)
#
# Any key can be overridden by the environment: SIDECAR_<SECTION>_<KEY>, for example
# SIDECAR_UPSTREAM_ENDPOINT or SIDECAR_OAUTH_CLIENT_SECRET. Secrets can be read from a file
{secret_files}
"""
_SECRET_FILES: Final = (
    "with <key>_file ({}). Relative paths are relative to the working directory, but a "
    "destination's dir: relative to this file's directory. Unknown keys and wrong types are "
    "errors that name the key. `caliper-sidecar check-config -c FILE` prints what will be used, "
    "secrets redacted."
)
_DESTINATIONS: Final = """\
# More places every event goes, beside [upstream] (none by default). Each has its own queue
# position, backoff, state, dead letters and metrics: one that is down or slow never holds back
# ingest or the others. Keys of the other kind are errors; the environment overrides a key of a
# destination defined here as SIDECAR_DESTINATIONS_<NAME>_<KEY>, e.g.
# SIDECAR_DESTINATIONS_DISTRICT_LRS_BEARER_TOKEN (OAUTH_<KEY> for its oauth table). SIGHUP may
# change a destination's secrets and its batch_max_events, batch_max_bytes, linger_ms,
# concurrency, timeout_s; a destination added or removed, or any other key changed, needs a
# restart.
"""
#: the example destinations' values (every other key: its default)
_EXAMPLE_DESTINATIONS: Final = (
    {"name": "district-lrs", "kind": "caliper", "endpoint": "https://lrs.district.example/caliper"},
    {"name": "archive", "kind": "archive", "dir": "/var/lib/caliper-sidecar/archive"},
)
_OAUTH_TABLE: Final = (
    "[destinations.oauth]",
    "instead of bearer_token: OAuth client credentials, with the keys of [oauth]",
)


def example_toml() -> str:
    """config/sidecar.example.toml, from the settings' types."""
    files = _SECRET_FILES.format(", ".join(f"{s}.{k}_file" for s, k in sorted(SECRETS)))
    wrapped = textwrap.wrap(files, _WIDTH - 2, break_on_hyphens=False)
    secret_files = "\n".join(f"# {line}" for line in wrapped)
    lines = [_HEADER.format(secret_files=secret_files)]
    for name, section in SECTIONS.items():
        lines.append(f"[{name}]")
        for field in msgspec.structs.fields(section):
            lines.extend(_key_lines(field))
        lines.append("")
    lines.append(_DESTINATIONS)
    lines.extend(_example_destinations())
    return "\n".join(lines)


def _example_destinations() -> list[str]:
    """`[[destinations]]` of each kind, commented out: each key of its kind, its value in the
    example or its default, and its meaning."""
    fields = {f.name: f for f in msgspec.structs.fields(DestinationSettings)}
    lines = []
    for example in _EXAMPLE_DESTINATIONS:
        lines.append("# [[destinations]]")
        for key in ("name", "kind", *DESTINATION_KEYS[example["kind"]]):
            if key == "oauth":  # a table: after the keys
                lines.extend(_commented(*_OAUTH_TABLE))
            else:
                lines.extend(_key_lines(fields[key], example.get(key), commented=True))
        lines.append("")
    return lines


def _key_lines(
    field: msgspec.structs.FieldInfo, value: Any = None, commented: bool = False
) -> list[str]:
    value = field.default if value is None else value
    return _commented(f"{field.encode_name} = {toml_value(value)}", _meaning(field.type), commented)


def _commented(line: str, comment: str, commented: bool = True) -> list[str]:
    """A line, then its comment from _COMMENT_AT on, wrapped; all commented out if asked."""
    indent = "# " if commented else ""
    line = f"{indent}{line}"
    if not comment:
        return [line]
    start = max(_COMMENT_AT, len(line) + 2)
    wrapped = textwrap.wrap(comment, _WIDTH - start - 2, break_on_hyphens=False)
    first = f"{line.ljust(start)}# {wrapped[0]}"
    return [first, *(f"{indent.rstrip().ljust(start)}# {more}" for more in wrapped[1:])]


def _meaning(kind: Any) -> str:
    """A key's description; for a choice without one, its choices."""
    args = get_args(kind)
    description = next(
        (m.description for m in args[1:] if isinstance(m, msgspec.Meta) and m.description), ""
    )
    if description:
        return str(description)
    choices = get_args(args[0]) if args else ()
    return "one of " + ", ".join(f'"{c}"' for c in choices) if choices else ""


def helm_values_schema() -> str:
    """The chart's values.schema.json: as it is in the repository, but for its definitions
    whose names end in `Settings`, generated from the settings' types (msgspec's JSON Schema).
    Secrets are left out (the chart takes them by reference, from Secrets, as `*_file` keys it
    sets), and so are the keys the chart sets itself: a values file holding one fails `helm
    lint`, naming it."""
    schema = json.loads((ROOT / HELM_SCHEMA).read_text())
    settings = msgspec.json.schema(Settings)["$defs"]
    left_out = {
        *SECRETS,
        *_CHART_KEYS,
        *(("destinations", key) for key in DESTINATION_SECRETS if "." not in key),
    }
    tables = {**{SECTIONS[s].__name__: s for s in SECTIONS}, "DestinationSettings": "destinations"}
    for name, definition in settings.items():
        table = tables.get(name)
        for key in list(definition.get("properties", {})):
            if (table, key) in left_out:
                del definition["properties"][key]
    hand_written = {k: v for k, v in schema["$defs"].items() if not k.endswith("Settings")}
    schema["$defs"] = {**hand_written, **settings}
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def generated() -> dict[Path, bytes]:
    """Every generated file, by its path in the repository."""
    return {
        EXAMPLE: example_toml().encode(),
        OPENAPI: openapi.rendered(),
        HELM_SCHEMA: helm_values_schema().encode(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m caliper_sidecar.tools.reference",
        description="Write the files generated from the code: "
        + ", ".join(generated_paths())
        + " (the test suite checks they are up to date).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 naming each file that is not up to date",
    )
    args = parser.parse_args(argv)
    stale = [path for path, content in generated().items() if _current(path) != content]
    if args.check:
        for path in stale:
            print(f"{path} is not up to date", file=sys.stderr)
        return 1 if stale else 0
    for path, content in generated().items():
        (ROOT / path).write_bytes(content)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def generated_paths() -> list[str]:
    return [str(path) for path in generated()]


def _current(path: str | Path) -> bytes | None:
    try:
        return (ROOT / path).read_bytes()
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
