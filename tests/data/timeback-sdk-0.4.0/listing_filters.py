"""TimeBack's official Python SDK (timeback-caliper 0.4.0) listing the fake TimeBack's stored
events as reconciliation lists them: `events.list` with `sensor`, `start_date`, `end_date`,
`limit` and `offset`, and `events.stream` paging through them. Not part of the test suite (the
SDK needs Python 3.12 and pydantic); run by hand against `caliper-sidecar mock-upstream` that
holds events (send some through a sidecar first), as docs/reconcile.md says:

    /tmp/sdk/bin/python listing_filters.py http://127.0.0.1:8798 SENSOR EVENT_TIME

It prints what each call returned and exits 1 when the filters do not hold.
"""

import asyncio
import sys
from datetime import datetime, timedelta

from timeback_caliper import CaliperClient


async def main(base: str, sensor: str, event_time: str) -> int:
    client = CaliperClient(
        platform="BEYOND_AI",
        base_url=base,
        auth_url=f"{base}/oauth2/token",
        client_id="sidecar",
        client_secret="sidecar-secret",
    )
    moment = datetime.fromisoformat(event_time.replace("Z", "+00:00"))
    before = (moment - timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    after = (moment + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    failures = 0
    around = await client.events.list(sensor=sensor, start_date=before, end_date=after, limit=3)
    print(f"list around {event_time}: total {around.pagination.total}, page {len(around.events)}")
    if not around.events or any(e.sensor != sensor for e in around.events):
        failures += 1
    later = await client.events.list(sensor=sensor, start_date=after, limit=3)
    print(f"list from {after}: total {later.pagination.total}")
    if any(e.event_time <= event_time for e in later.events):
        failures += 1
    other = await client.events.list(sensor="https://nobody.example/sensor", limit=3)
    print(f"list of another sensor: total {other.pagination.total}")
    if other.pagination.total:
        failures += 1
    streamed = await client.events.stream(sensor=sensor, limit=2, max_items=7).to_list()
    print(f"stream 2 a page, at most 7: {len(streamed)} events")
    if len(streamed) != min(7, around.pagination.total + later.pagination.total) and not streamed:
        failures += 1
    await client.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:4])))
