"""Waiting for the operator's stop: SIGTERM (systemd, Kubernetes) or SIGINT (Ctrl-C); and
SIGHUP, which would kill the process by default: `run` reloads what may change without a
restart (reload.py), anything else that waits here logs it as ignored.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog

log = structlog.get_logger("sidecar.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _hangup() -> None:
    log.warning("sighup_ignored", hint="restart the sidecar to apply a configuration change")


async def until_stop_signal(on_hangup: Callable[[], object] | None = None) -> None:
    """Return when SIGTERM or SIGINT arrives; call `on_hangup` at each SIGHUP. The default
    handlers are restored after."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hangup or _hangup)
    try:
        await stop.wait()
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)
