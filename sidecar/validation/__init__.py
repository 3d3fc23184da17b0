"""Validation at the door: every event is checked before it is acknowledged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .issues import Finding, Report, pointer
from .structural import check_structure

__all__ = ["Finding", "Report", "pointer", "validate_events"]


def validate_events(events: Sequence[Any], mode: str = "strict") -> Report:
    """Check each event; `mode` is `validation.mode` ("strict", "warn" or "off").

    The structural checks apply in every mode: the outbox needs an id to deduplicate.
    """
    report = Report()
    for index, event in enumerate(events):
        report.errors.extend(check_structure(index, event))
    return report
