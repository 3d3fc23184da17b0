"""Steady state: ingest at a fixed rate while delivering; the outbox depth must stay bounded.

    .venv/bin/python bench/steady.py [--rate 1000] [--seconds 30] [--batch 1]

Starts the fake TimeBack and a sidecar (default configuration: synchronous = "full", 100-event
envelopes, linger 200 ms), then posts `rate` events per second (`batch` per request) on a fixed
schedule for `seconds`, sampling /v1/status twice a second. Reports the achieved rate, the
outbox depth (median, max, at the end) and how long the rest took to drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from common import fake_and_sidecar, machine, median

from caliper_sidecar.tools.samples import sample_events

CLIENTS = 16


async def load(url: str, rate: int, seconds: int, batch: int, sent: list[int]) -> None:
    """Post `rate` events/s on a fixed schedule, spread over CLIENTS connections."""
    interval = CLIENTS * batch / rate
    templates = sample_events()
    started = time.perf_counter()

    async def client(offset: float, session: aiohttp.ClientSession) -> None:
        n = 0
        while True:
            at = started + offset + n * interval
            if at - started > seconds:
                return
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            events = []
            for i in range(batch):
                event = dict(templates[(n + i) % len(templates)])
                event["id"] = f"urn:uuid:{uuid.uuid4()}"
                events.append(event)
            body = json.dumps(events[0] if batch == 1 else events)
            async with session.post(
                f"{url}/v1/events", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                if resp.status == 202:
                    sent[0] += batch
            n += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(i * interval / CLIENTS, session) for i in range(CLIENTS)))


async def sample(url: str, stop: asyncio.Event, depths: list[int]) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.get(f"{url}/v1/status") as resp:
                depths.append((await resp.json())["outbox"]["events"])
            await asyncio.sleep(0.5)


async def run(url: str, rate: int, seconds: int, batch: int) -> None:
    depths: list[int] = []
    sent = [0]
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(url, stop, depths))
    started = time.perf_counter()
    await load(url, rate, seconds, batch, sent)
    elapsed = time.perf_counter() - started
    load_samples = list(depths)
    drain_started = time.perf_counter()
    while depths[-1] > 0 and time.perf_counter() - drain_started < 60:
        await asyncio.sleep(0.1)
    drained = time.perf_counter() - drain_started
    stop.set()
    await sampler
    print(f"machine: {machine()}")
    print(
        f"offered {rate} events/s ({batch} per request) for {seconds} s; "
        f"accepted {sent[0] / elapsed:,.0f} events/s"
    )
    print(
        f"outbox depth while loading: median {median(load_samples):.0f}, "
        f"max {max(load_samples)}, last {load_samples[-1]}"
    )
    print(f"drained to 0 within {drained:.1f} s after the load stopped")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fake, server = fake_and_sidecar(tmp, outbox={"path": str(tmp / "outbox.db")})
        try:
            asyncio.run(run(server.url, args.rate, args.seconds, args.batch))
        finally:
            server.stop()
            fake.stop()
            problems = [
                line
                for line in (tmp / f"sidecar-{server.port}.log").read_text().splitlines()
                if '"level":"warning"' in line or '"level":"error"' in line
            ]
            print(f"sidecar warnings and errors: {len(problems)}")
            for line in problems[:5]:
                print("  " + line[:300])


if __name__ == "__main__":
    main()
