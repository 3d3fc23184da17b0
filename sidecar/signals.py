"""Waiting for the operator's stop: SIGTERM (systemd, Kubernetes) or SIGINT (Ctrl-C)."""

from __future__ import annotations

import asyncio
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def until_stop_signal() -> None:
    """Return when SIGTERM or SIGINT arrives; the default handlers are restored after."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
