"""A district's Caliper endpoint and an archive as [[destinations]] of a test sidecar: what the
tests of destinations and of the status page share."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import msgspec

from caliper_sidecar.config import DestinationSettings, Settings
from caliper_sidecar.tools.fake_timeback import FakeTimeBack, RunningFake, start_fake

from .conftest import settings_for

DISTRICT_TOKEN = "district-lrs-static-token-0123456789"


async def start_district() -> RunningFake:
    """A second Caliper endpoint, the district's, which knows only its own static token."""
    running = await start_fake(FakeTimeBack(client_id="district", client_secret="not-used"))
    running.fake.tokens[DISTRICT_TOKEN] = time.time() + 3600
    return running


def with_destinations(
    platform: RunningFake,
    district: RunningFake,
    tmp_path: Path,
    when_full: Literal["block", "dead_letter"] = "block",
    **sections: dict[str, Any],
) -> Settings:
    """The test sidecar's settings (`settings_for`), with the district's endpoint as
    `district-lrs` and an archive under tmp_path as `archive`."""
    return msgspec.structs.replace(
        settings_for(platform, tmp_path, **sections),
        destinations=(
            DestinationSettings(
                name="district-lrs",
                kind="caliper",
                endpoint=district.events_url,
                bearer_token=DISTRICT_TOKEN,
                linger_ms=20,
                timeout_s=5,
                when_full=when_full,
            ),
            DestinationSettings(name="archive", kind="archive", dir=str(tmp_path / "archive")),
        ),
    )
