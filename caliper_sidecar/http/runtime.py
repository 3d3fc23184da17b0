"""The parts of a running sidecar, as the HTTP routes see them (stored under one AppKey)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from caliper_sidecar.config import DestinationSettings, Settings
from caliper_sidecar.delivery.confirmations import JobFollower
from caliper_sidecar.delivery.dispatcher import Dispatcher
from caliper_sidecar.delivery.reads import PlatformReader
from caliper_sidecar.delivery.reconciling import ReconcileLoop
from caliper_sidecar.delivery.tokens import TokenSource
from caliper_sidecar.http.auth import FailedTokenRequests
from caliper_sidecar.http.connections import BODIES_IN_FLIGHT, ByteBudget
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.outbox import Outbox
from caliper_sidecar.validation.decoder import Decoder, decoder_for


@dataclass(frozen=True)
class Destination:
    """One of [[destinations]] as the routes see it: its settings (as at start: SIGHUP applies
    none of a destination's keys), its dispatcher, and its token source (a caliper
    destination's; None for an archive)."""

    settings: DestinationSettings
    dispatcher: Dispatcher
    tokens: TokenSource | None = None


@dataclass
class Runtime:
    """Everything a request handler needs; built once by `app.py`."""

    settings: Settings
    outbox: Outbox
    metrics: Metrics
    dispatcher: Dispatcher | None = None
    tokens: TokenSource | None = None
    follower: JobFollower | None = None
    #: what is read through to the platform (`GET /caliper/events`), when it lists events
    reader: PlatformReader | None = None
    #: reconciliation's rounds (`reconcile.after_s` set), whose totals the status shows
    reconciling: ReconcileLoop | None = None
    #: each of [[destinations]], in the configuration's order ([upstream]'s is `dispatcher`)
    destinations: tuple[Destination, ...] = ()
    #: per-event serialized size limit, from batch_max_bytes minus the envelope's own bytes
    max_event_bytes: int = 0
    accepting: bool = True
    #: ingest requests whose events are being committed now (what shutdown waits for)
    commits_in_progress: int = 0
    #: token requests refused, by address (a client that keeps failing is slowed down)
    token_failures: FailedTokenRequests = field(default_factory=FailedTokenRequests)
    #: monotonic time of the last `token_requests_refused` line, and refusals since
    token_refusals_logged: tuple[float, int] = (-math.inf, 0)
    body_budget: ByteBudget = field(init=False)
    #: validation while parsing, for the configured profile; None with validation off
    decoder: Decoder | None = field(init=False)

    def __post_init__(self) -> None:
        self.body_budget = ByteBudget(BODIES_IN_FLIGHT * self.settings.receiver.max_body_bytes)
        self.use_settings(self.settings)

    def use_settings(self, settings: Settings) -> None:
        """Serve by these settings from the next request on (a SIGHUP's)."""
        self.settings = settings
        validation = settings.validation
        self.decoder = None if validation.mode == "off" else decoder_for(validation.profile)


RUNTIME: Final = web.AppKey("runtime", Runtime)
