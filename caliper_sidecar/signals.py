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


class StopSignals:
    """SIGTERM and SIGINT set `stop`; SIGHUP calls `on_hangup` (settable later: what a reload
    changes exists only once the sidecar runs). Installed before anything else starts, so that
    neither signal is ever met by its default action, which kills the process (a rollout that
    stops a sidecar right after starting it, a reload sent while it starts); the default
    handlers are restored on exit."""

    def __init__(self, on_hangup: Callable[[], object] | None = None) -> None:
        self.stop = asyncio.Event()
        self.on_hangup = on_hangup

    def __enter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        return self

    def __exit__(self, *_: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _hangup(self) -> None:
        (self.on_hangup or _hangup)()
