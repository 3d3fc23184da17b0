"""Files generated from the code, so that they cannot drift from it (a test regenerates each
and compares):

- config/sidecar.example.toml: every key of every section, its default and its meaning, from
  the settings' types (config.py);
- docs/openapi.json: the HTTP API, whose answer bodies come from http/bodies.py.

    python -m caliper_sidecar.tools.reference      # writes both
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any, Final, get_args

import msgspec

from caliper_sidecar.config import SECRETS, SECTIONS, toml_value
from caliper_sidecar.http import openapi

ROOT: Final = Path(__file__).resolve().parents[2]
EXAMPLE: Final = Path("config/sidecar.example.toml")
OPENAPI: Final = Path("docs/openapi.json")
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
    "with <key>_file ({}). Relative paths are relative to the working directory. Unknown keys "
    "and wrong types are errors that name the key. `caliper-sidecar check-config -c FILE` "
    "prints what will be used, secrets redacted."
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
    return "\n".join(lines)


def _key_lines(field: msgspec.structs.FieldInfo) -> list[str]:
    line = f"{field.encode_name} = {toml_value(field.default)}"
    comment = _meaning(field.type)
    if not comment:
        return [line]
    start = max(_COMMENT_AT, len(line) + 2)
    wrapped = textwrap.wrap(comment, _WIDTH - start - 2, break_on_hyphens=False)
    first = f"{line.ljust(start)}# {wrapped[0]}"
    return [first, *(f"{' ' * start}# {more}" for more in wrapped[1:])]


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


def generated() -> dict[Path, bytes]:
    """Every generated file, by its path in the repository."""
    return {EXAMPLE: example_toml().encode(), OPENAPI: openapi.rendered()}


def main() -> None:
    for path, content in generated().items():
        (ROOT / path).write_bytes(content)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
