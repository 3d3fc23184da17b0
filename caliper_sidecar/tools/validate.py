"""`caliper-sidecar validate`: check events offline, from files or standard input."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from caliper_sidecar import codec
from caliper_sidecar.validation import validate_events
from caliper_sidecar.validation.shape import ShapeError, events_of

_COLOURS = {"error": "\033[31m", "warning": "\033[33m", "valid": "\033[32m", "invalid": "\033[31m"}
_RESET = "\033[0m"


def validate_command(
    files: Sequence[str],
    as_json: bool = False,
    profile: str = "timeback",
    out: TextIO | None = None,
) -> int:
    """Validate each file (or stdin, `-`); returns 1 when anything is invalid, else 0."""
    out = out or sys.stdout
    results = [_check(name, profile) for name in (list(files) or ["-"])]
    invalid = any(r["errors"] for r in results)
    if as_json:
        json.dump({"valid": not invalid, "profile": profile, "files": results}, out, indent=2)
        out.write("\n")
    else:
        colour = wants_colour(out)
        for r in results:
            _render(r, out, colour)
    return 1 if invalid else 0


def wants_colour(stream: Any) -> bool:
    """Colour on a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return bool(stream.isatty()) and not os.environ.get("NO_COLOR")


def _check(name: str, profile: str) -> dict[str, Any]:
    result: dict[str, Any] = {"file": name, "events": 0, "errors": [], "warnings": []}
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        items = [item for doc in _documents(data) for item in events_of(doc)]
        codec.dumps(items)  # text that is not Unicode (a lone surrogate), as the receiver does
    except (OSError, ValueError, RecursionError, ShapeError) as e:
        if isinstance(e, OSError):
            message = f"cannot read the file: {e}"
        elif isinstance(e, RecursionError):
            message = "the JSON is nested too deeply"
        else:
            message = str(e)
        result["errors"].append({"index": None, "path": "", "message": message, "rule": "shape"})
        return result
    report = validate_events(items, "strict", profile, allow_entities=True, limit=None)
    result["events"] = len(items)
    result["errors"] = [f.as_dict() for f in report.errors]
    result["warnings"] = [f.as_dict() for f in report.warnings]
    return result


def _documents(data: bytes) -> list[Any]:
    """One JSON document, or JSON Lines (one document per line), parsed as the receiver
    parses a body."""
    try:
        return [codec.loads(data)]
    except ValueError:
        lines = [line for line in data.splitlines() if line.strip()]
        if len(lines) < 2:
            raise
        documents = []
        for number, line in enumerate(lines, 1):
            try:
                documents.append(codec.loads(line))
            except ValueError as e:
                raise ValueError(f"line {number}: {e}") from None
        return documents


def _render(result: dict[str, Any], out: TextIO, colour: bool) -> None:
    def paint(word: str) -> str:
        return f"{_COLOURS[word]}{word}{_RESET}" if colour else word

    errors, warnings = result["errors"], result["warnings"]
    out.write(
        f"{result['file']}: {paint('invalid' if errors else 'valid')} "
        f"({result['events']} item(s), {len(errors)} error(s), {len(warnings)} warning(s))\n"
    )
    for kind, findings in (("error", errors), ("warning", warnings)):
        for f in findings:
            where = f"item {f['index']}" if f["index"] is not None else "document"
            out.write(f"  {paint(kind)} {where} {f['path'] or '/'}: {f['message']} [{f['rule']}]\n")
