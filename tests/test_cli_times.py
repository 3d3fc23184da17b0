"""The times the command line takes (caliper_sidecar/cli_times.py)."""

from __future__ import annotations

import re

import pytest

from caliper_sidecar.cli_times import parse_moment

NOW = 1_796_457_600.0  # 2026-12-05T08:00:00Z


class TestParseMoment:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("2026-12-05T08:00:00Z", NOW),
            ("2026-12-05T09:00:00+01:00", NOW),
            ("2026-12-05T07:30:00-00:30", NOW),
            ("2026-12-05T08:00:00.250Z", NOW + 0.25),
            ("2026-12-05t08:00:00z", NOW),
            ("2026-12-05 08:00:00Z", NOW),
        ],
    )
    def test_rfc_3339_with_its_offset(self, text: str, expected: float) -> None:
        """An RFC 3339 time names its instant, whatever its offset; `now` plays no part."""
        assert parse_moment(text, now=0.0) == expected

    @pytest.mark.parametrize(
        ("text", "ago"), [("30s", 30), ("90m", 5400), ("2h", 7200), ("7d", 604_800), ("0m", 0)]
    )
    def test_a_duration_is_that_long_before_now(self, text: str, ago: int) -> None:
        """A duration means that long before `now`."""
        assert parse_moment(text, NOW) == NOW - ago

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "yesterday",
            "2026-12-05T08:00:00",  # no offset: no instant
            "2026-12-05",
            "2026-02-30T08:00:00Z",
            "2026-12-05T25:00:00Z",
            "-2h",
            "2w",
            "1.5h",
            "h",
        ],
    )
    def test_anything_else_is_refused_naming_the_text(self, text: str) -> None:
        """What is neither raises ValueError whose message quotes the text."""
        with pytest.raises(ValueError, match="^" + re.escape(f"{text!r} is not a time")):
            parse_moment(text, NOW)
