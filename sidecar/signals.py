"""Waiting for the operator's stop: SIGTERM (systemd, Kubernetes) or SIGINT (Ctrl-C).

SIGHUP, which would kill the process by default (a closed terminal, a stray `kill -HUP`, a
`systemctl reload` habit), is ignored with a log line: the configuration is read at start, so a
change is a restart.
"""

from __future__ import annotations

import asyncio
import signal

import structlog

log = structlog.get_logger("sidecar.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _hangup() -> None:
    log.warning("sighup_ignored", hint="restart the sidecar to apply a configuration change")


async def until_stop_signal() -> None:
    """Return when SIGTERM or SIGINT arrives; the default handlers are restored after."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _hangup)
    try:
        await stop.wait()
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)
