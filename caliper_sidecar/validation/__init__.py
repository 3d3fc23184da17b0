"""Validation at the door: every event is checked before it is acknowledged.

`validate_events` applies, in order, the structural checks (always: the outbox relies on
them), then the rules of the selected profile (`validation.profile`):

- `caliper`: Caliper 1.2 only;
- `timeback`: what both TimeBack platforms accept: Caliper 1.2 with TimeBack's additions for
  standard events, and TimeBack's own profile as its official SDK builds it;
- `timeback-learnwith`: `timeback` plus the identity rules of LearnWith.AI's events reference
  (the presets for LearnWith.AI choose it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from caliper_sidecar.presets import PROFILES
from caliper_sidecar.validation.caliper import CaliperChecker, looks_like_event, property_table
from caliper_sidecar.validation.issues import Finding, Report, pointer
from caliper_sidecar.validation.structural import check_structure
from caliper_sidecar.validation.timeback import EXTRA_PROPERTIES, TimeBackChecker
from caliper_sidecar.validation.timeback_profile import TimebackProfileChecker, is_profile_event

__all__ = ["MAX_FINDINGS", "PROFILES", "Finding", "Report", "pointer", "validate_events"]

#: findings of each kind an answer carries at most (the rest are counted)
MAX_FINDINGS = 100

_TIMEBACK_PROPERTIES = property_table(EXTRA_PROPERTIES)
_PROPERTIES = {
    "caliper": property_table({}),
    "timeback": _TIMEBACK_PROPERTIES,
    "timeback-learnwith": _TIMEBACK_PROPERTIES,
}


def validate_events(
    events: Sequence[Any],
    mode: str = "strict",
    profile: str = "timeback",
    allow_entities: bool = False,
    limit: int | None = MAX_FINDINGS,
) -> Report:
    """Check each item; `mode` and `profile` are `validation.mode` and `validation.profile`.

    In "off" mode only the structural checks run. In "warn" mode the rule findings come back
    as warnings. Entity describes (envelope items that are not events) are validated as
    entities when `allow_entities`, and refused otherwise: the sidecar forwards events.
    """
    report = Report(limit)
    timeback = profile != "caliper"
    learnwith = profile == "timeback-learnwith"
    properties = _PROPERTIES[profile]
    for index, item in enumerate(events):
        if isinstance(item, dict) and not looks_like_event(item):
            if allow_entities:
                checker = CaliperChecker(index, properties)
                checker.describe(item)
                _collect(report, checker.errors, checker.warnings, mode)
            else:
                report.add_errors(
                    [
                        Finding(
                            index,
                            "",
                            "this is an entity describe, not an event (it has no `action`); "
                            "the sidecar accepts and forwards events only",
                            "event-object",
                        )
                    ]
                )
            continue
        structural = check_structure(index, item)
        report.add_errors(structural)
        if mode == "off" or structural:
            continue
        if timeback and is_profile_event(item):
            own = TimebackProfileChecker(index)
            own.event(item)
            _collect(report, own.errors, own.warnings, mode)
            continue
        caliper = CaliperChecker(index, properties)
        caliper.event(item)
        errors, warnings = caliper.errors, caliper.warnings
        if timeback:
            rules = TimeBackChecker(index, learnwith)
            rules.event(item)
            errors, warnings = errors + rules.errors, warnings + rules.warnings
        _collect(report, errors, warnings, mode)
    return report


def _collect(report: Report, errors: list[Finding], warnings: list[Finding], mode: str) -> None:
    if mode == "warn":
        report.add_warnings(errors)
    else:
        report.add_errors(errors)
    report.add_warnings(warnings)
