"""`caliper-sidecar validate`: check events offline, from files or standard input."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .validation import Finding, validate_events
from .validation.shape import ShapeError, events_of


def validate_command(files: Sequence[str], as_json: bool = False, out: TextIO = sys.stdout) -> int:
    """Validate each file (or stdin); returns 1 when anything is invalid, else 0."""
    sources = list(files) or ["-"]
    results: list[dict[str, Any]] = []
    for name in sources:
        text = sys.stdin.read() if name == "-" else _read(name)
        results.append(_check(name, text))
    invalid = any(r["errors"] for r in results)
    if as_json:
        json.dump({"valid": not invalid, "files": results}, out, indent=2)
        out.write("\n")
    else:
        for r in results:
            _render(r, out)
    return 1 if invalid else 0


def _read(name: str) -> str:
    try:
        with open(name, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        return json.dumps({"__unreadable__": e.strerror})


def _check(name: str, text: str) -> dict[str, Any]:
    result: dict[str, Any] = {"file": name, "events": 0, "errors": [], "warnings": []}
    try:
        documents = _documents(text)
        events = [e for doc in documents for e in events_of(doc)]
    except (ValueError, ShapeError) as e:
        result["errors"].append({"index": None, "path": "", "message": str(e), "rule": "shape"})
        return result
    report = validate_events(events)
    result["events"] = len(events)
    result["errors"] = [f.as_dict() for f in report.errors]
    result["warnings"] = [f.as_dict() for f in report.warnings]
    return result


def _documents(text: str) -> list[Any]:
    """One JSON document, or JSON Lines (one document per line)."""
    try:
        document = json.loads(text)
    except ValueError:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            raise
        return [json.loads(line) for line in lines]
    if isinstance(document, dict) and "__unreadable__" in document:
        raise ValueError(f"cannot read the file: {document['__unreadable__']}")
    return [document]


def _render(result: dict[str, Any], out: TextIO) -> None:
    errors: list[dict[str, Any]] = result["errors"]
    warnings: list[dict[str, Any]] = result["warnings"]
    verdict = "invalid" if errors else "valid"
    out.write(
        f"{result['file']}: {verdict} ({result['events']} event(s), "
        f"{len(errors)} error(s), {len(warnings)} warning(s))\n"
    )
    for kind, findings in (("error", errors), ("warning", warnings)):
        for f in findings:
            where = f"event {f['index']}" if f["index"] is not None else "document"
            out.write(f"  {kind}: {where} {f['path'] or '/'}: {f['message']} [{f['rule']}]\n")


__all__ = ["Finding", "validate_command"]
