"""What a validator reports: one finding per broken rule, located by a JSON pointer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Finding:
    """A broken rule: which event (`index`), where in it (`path`), why, and which rule."""

    index: int
    path: str
    message: str
    rule: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Report:
    """Errors reject an event (in strict mode); warnings never do.

    At most `limit` findings of each kind are kept (None: all), the rest only counted: a body
    full of problems must not become a response (and a memory peak) many times its size.
    """

    limit: int | None = None
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    error_count: int = 0
    warning_count: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def add_errors(self, findings: list[Finding]) -> None:
        if not findings:  # the common case, once per event
            return
        self.error_count += len(findings)
        self.errors.extend(findings[: self._room(self.errors)])

    def add_warnings(self, findings: list[Finding]) -> None:
        if not findings:
            return
        self.warning_count += len(findings)
        self.warnings.extend(findings[: self._room(self.warnings)])

    def _room(self, kept: list[Finding]) -> int | None:
        return None if self.limit is None else max(0, self.limit - len(kept))


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901) from path parts."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class Checker:
    """Collects one item's findings; `prefix` names the rule set ("caliper", "timeback")."""

    prefix = ""

    def __init__(self, index: int) -> None:
        self.index = index
        self.errors: list[Finding] = []
        self.warnings: list[Finding] = []

    def error(self, path: str, message: str, rule: str) -> None:
        self.errors.append(Finding(self.index, path, message, f"{self.prefix}.{rule}"))

    def warn(self, path: str, message: str, rule: str) -> None:
        self.warnings.append(Finding(self.index, path, message, f"{self.prefix}.{rule}"))


def kind_of(value: Any) -> str:
    """How a JSON value is named in messages: "a string", "an array", "null"…"""
    if value is None:
        return "null"
    return _KINDS.get(type(value), type(value).__name__)


_KINDS = {
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}
