"""A fake TimeBack: OAuth2 token endpoints and the Caliper endpoints of both platforms, with
fault injection.

It checks what the real platforms check (client credentials, expiring bearer tokens, the
envelope's exact shape, the form of TimeBack's profile each platform takes) and records what it
accepts, so tests, the demo and benchmarks can compare what was acknowledged with what arrived.

- `/caliper/v1p2` is LearnWith.AI: it refuses `TimebackProfile` events (that platform takes the
  `AggregationProfile` form the SDK rewrites them into) and has no jobs.
- `/caliper/event` is Beyond AI: it answers `{"jobId", "eventsAccepted"}` and processes each
  envelope as a job, `GET /jobs/{id}/status` saying `waiting`, `active`, then `completed` or
  `failed` (with per-event failures injectable).
- `/events/1.0/` is the older TimeBack events API: a plain 200.

Faults are set from Python (`FakeTimeBack.faults`) or over HTTP (`POST /_mock/faults`), for a
learning app developed offline; `POST /_mock/wipe` (`FakeTimeBack.wipe`) makes it forget every
event it holds, as a platform restored from an old backup.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from caliper_sidecar import codec
from caliper_sidecar.envelope import DATA_VERSION, ENVELOPE_KEYS
from caliper_sidecar.http.auth import basic_credentials
from caliper_sidecar.signals import StopSignals

TOKEN_PATH: Final = "/auth/1.0/token"
COGNITO_TOKEN_PATH: Final = "/oauth2/token"
EVENTS_PATH: Final = "/events/1.0/"
LEARNWITH_PATH: Final = "/caliper/v1p2"
BEYOND_PATH: Final = "/caliper/event"
JOBS_PATH: Final = "/jobs/{id}/status"
_NOT_KEPT: Final[dict[str, Any]] = {}
JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SEND_TIME: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@dataclass
class ScriptedFault:
    """Answer the next `times` requests with this status (and Retry-After, when given), and
    this JSON body (an `injected fault` error by default), or this text as it is (`text`: an
    HTML page, an empty body) with its content type."""

    status: int
    times: int = 1
    retry_after: str | None = None
    body: Any = None
    text: str | None = None
    content_type: str = "text/html"


#: what a school's web filter or a captive portal answers in the platform's place
WEB_FILTER_PAGE: Final = (
    "<!DOCTYPE html><html><head><title>Blocked</title></head><body><h1>This site is blocked "
    "by your school's web filter</h1><p>Category: uncategorised.</p></body></html>"
)


@dataclass
class Faults:
    """What the fake platform does wrong, and when."""

    #: answers for the next Caliper requests, consumed in order (after auth checks)
    script: deque[ScriptedFault] = field(default_factory=deque)
    #: answers for the next token requests
    token_script: deque[ScriptedFault] = field(default_factory=deque)
    #: 200 answers (JSON bodies) for the next token requests, whatever their credentials
    token_answers: deque[dict[str, Any]] = field(default_factory=deque)
    latency_s: float = 0.0
    token_latency_s: float = 0.0
    #: Caliper requests served at once (0: any number), each taking `latency_s`: past it they
    #: wait their turn, so their latency rises, and past `capacity + capacity_queue` at the
    #: platform they are answered 429 with Retry-After: 1 (a platform of limited capacity)
    capacity: int = 0
    capacity_queue: int = 0
    #: an envelope holding any of these event ids is refused with 422, as a whole
    refuse_ids: set[str] = field(default_factory=set)
    #: envelopes larger than this many bytes are refused with 413
    max_envelope_bytes: int | None = None
    #: until this time (time.monotonic()), connections are dropped without an answer
    outage_until: float = 0.0
    #: probability that a request meets a random fault (chaos testing)
    chaos_rate: float = 0.0
    #: a random fault that sleeps sleeps this long (set it past the client's timeout)
    chaos_slow_s: float = 2.0
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    #: Beyond AI: a job holding any of these event ids fails, naming them (the others succeed)
    fail_job_ids: set[str] = field(default_factory=set)
    #: Beyond AI: jobs are processed this long after the envelope arrived
    job_delay_s: float = 0.2
    #: Beyond AI: jobs never finish (stay `active`)
    stuck_jobs: bool = False
    #: Beyond AI: the jobs route answers 404 to the first this many polls of each job (a job
    #: store that lags behind the endpoint)
    job_lag_polls: int = 0
    #: Beyond AI: envelopes are answered 200 without a `jobId`
    omit_job_id: bool = False
    #: every envelope is refused with this (status, JSON body), whatever it holds
    refuse_all: tuple[int, Any] | None = None
    #: how an envelope holding `refuse_ids` is refused: 422 as a whole, a 207 listing the
    #: failed events, or a 200 JSON answer with a non-empty `errors` list
    refusal_status: int = 422
    #: every Caliper request is answered `200 text/html` by a web filter in front of the
    #: platform (which never sees it)
    web_filter: bool = False
    #: Beyond AI: a job holding any of these ids completes without naming them in its
    #: `results` (each id once: its next job names it)
    job_omit_ids: set[str] = field(default_factory=set)
    #: the next this many Caliper (or token) requests get a 503 whose body never ends
    huge_answers: int = 0
    huge_token_answers: int = 0
    #: the share of events answered as taken and then silently lost (a platform restored from
    #: a backup, a store that drops writes): each at its first arrival, so one sent again stays
    lose_rate: float = 0.0
    #: events answered as taken and lost at every arrival: never held however often sent
    lose_ids: set[str] = field(default_factory=set)
    lose_rng: random.Random = field(default_factory=lambda: random.Random(2))
    #: Beyond AI's listings (`GET /caliper/events[/{id}]`): answers for the next reads
    read_script: deque[ScriptedFault] = field(default_factory=deque)
    #: … and while this is clear, reads wait for it (a listing as slow as a test wants)
    reads_open: asyncio.Event = field(default_factory=lambda: _opened(asyncio.Event()))


@dataclass
class FakeJob:
    """One envelope as Beyond AI processes it."""

    id: str
    event_ids: list[str]
    created: float  # time.monotonic()
    failing: list[str]
    stuck: bool
    polls: int = 0
    #: events processed but left out of the job's `results`
    omitted: frozenset[str] = frozenset()

    def document(self, delay_s: float) -> dict[str, Any]:
        age = time.monotonic() - self.created
        if self.stuck or age < delay_s:
            return {"id": self.id, "state": "waiting" if age < delay_s / 2 else "active"}
        results = [
            {"allocatedId": str(abs(hash(i)) % 10**9), "externalId": i}
            for i in self.event_ids
            if i not in self.failing and i not in self.omitted
        ]
        done: dict[str, Any] = {"id": self.id, "processedOn": "2024-01-15T10:00:00.000Z"}
        if self.failing:
            reason = "; ".join(f"event {i} rejected: extension not allowed" for i in self.failing)
            return {
                **done,
                "state": "failed",
                "failedReason": reason,
                "returnValue": {"status": "error", "results": results},
            }
        return {
            **done,
            "state": "completed",
            "returnValue": {"status": "success", "results": results},
        }


class FakeTimeBack:
    """The fake platform's state: who may get tokens, which tokens live, what arrived."""

    def __init__(
        self,
        client_id: str = "sidecar",
        client_secret: str = "sidecar-secret",
        token_ttl_s: float = 3600.0,
        client_public_key: str | None = None,
        keep_events: bool = True,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl_s = token_ttl_s
        #: PEM public key: clients may then authenticate with private_key_jwt (RFC 7523)
        self.client_public_key = client_public_key
        #: False keeps only the ids of what arrives (for benchmarks with millions of events)
        self.keep_events = keep_events
        self.faults = Faults()
        self.tokens: dict[str, float] = {}  # access token -> expiry (time.time())
        self.received: dict[str, dict[str, Any]] = {}  # event id -> first copy received
        self.arrived_via: dict[str, str] = {}  # event id -> the path it first arrived on
        self.sensors: dict[str, str] = {}  # event id -> the sensor of its first envelope
        self.jobs: dict[str, FakeJob] = {}
        self.order: list[str] = []  # event ids in the order first received
        #: ids answered as taken and lost (`Faults.lose_rate`, `lose_ids`): not in `received`
        self.lost: set[str] = set()
        #: how often each lost id arrived and was lost
        self.lost_arrivals: Counter[str] = Counter()
        self.duplicates = 0
        self.envelopes = 0
        #: Caliper requests at the platform now (served or waiting their turn), and the most
        #: there at once (a test may set it back to 0 to watch a later part of a run)
        self.at_once = 0
        self.most_at_once = 0
        self._serving = 0  # of those, the ones being served (at most `faults.capacity`)
        self._turns: deque[asyncio.Future[None]] = deque()  # the ones waiting their turn
        #: the bytes of the last envelope accepted (what a test compares byte for byte)
        self.last_raw_envelope = b""
        self.statuses: Counter[int] = Counter()
        #: Caliper requests that reached the platform, answered or not yet (what a test waits
        #: for to know an envelope is in flight)
        self.requests_arrived = 0
        self.token_requests = 0
        #: the raw path (and query) of every listing read that reached the platform
        self.reads: list[str] = []
        #: (started, ended, status) of every Caliper request, when a test sets it to a list
        self.request_log: list[tuple[float, float, int]] | None = None
        self.max_events_seen = 0
        self.max_envelope_bytes_seen = 0
        #: the last accepted envelope, without its data
        self.last_envelope: dict[str, Any] = {}
        self.arrived = asyncio.Event()  # set whenever events are recorded
        #: bytes of never-ending answers that were written before the client stopped reading
        self.huge_bytes_sent = 0

    # -- the application -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes(
            [
                web.post(TOKEN_PATH, self._token),
                web.post(COGNITO_TOKEN_PATH, self._token),
                web.post(EVENTS_PATH, self._events),
                web.post(LEARNWITH_PATH, self._events),
                web.post(BEYOND_PATH, self._events),
                web.get(JOBS_PATH, self._job_status),
                web.get(BEYOND_PATH + "s", self._stored_events),
                web.get(BEYOND_PATH + "s/{id}", self._stored_event),
                web.get("/_mock/events", self._list_events),
                web.post("/_mock/faults", self._set_faults),
                web.post("/_mock/wipe", self._wipe),
                web.get("/healthz", self._alive),
            ]
        )
        return app

    def revoke_tokens(self) -> None:
        """Every token issued so far stops working (the platform rotated its keys)."""
        self.tokens.clear()

    def wipe(self) -> None:
        """Forget every event held, as a platform restored from a backup older than all of
        them; what was counted (envelopes, duplicates, statuses) stays."""
        for held in (self.received, self.arrived_via, self.sensors):
            held.clear()
        self.order.clear()

    def fail_next(
        self,
        status: int,
        times: int = 1,
        retry_after: str | None = None,
        body: Any = None,
        text: str | None = None,
        content_type: str = "text/html",
    ) -> None:
        self.faults.script.append(
            ScriptedFault(status, times, retry_after, body, text, content_type)
        )

    def outage(self, seconds: float) -> None:
        """Drop every connection for this long (the platform is down)."""
        self.faults.outage_until = time.monotonic() + seconds

    async def wait_for(self, ids: set[str] | int, timeout: float = 30.0) -> None:
        """Wait until these ids (or this many distinct events) have arrived."""
        deadline = time.monotonic() + timeout
        while not self._has(ids):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                have = len(self.received)
                raise TimeoutError(f"fake TimeBack has {have} events; still waiting for {ids!r}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)

    def _has(self, ids: set[str] | int) -> bool:
        if isinstance(ids, int):
            return len(self.received) >= ids
        return ids <= self.received.keys()

    # -- token endpoint --------------------------------------------------------------------

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        """A 503 whose body goes on (up to 1 GiB) for as long as the client reads it."""
        response = web.StreamResponse(status=503, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b" " * 1_048_576
        try:
            for _ in range(1024):
                await response.write(chunk)
                self.huge_bytes_sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client went away: what it read is counted
        return response

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.token_requests += 1
        if self.faults.huge_token_answers > 0:
            self.faults.huge_token_answers -= 1
            return await self._endless(request)
        if self.faults.token_latency_s:
            await asyncio.sleep(self.faults.token_latency_s)
        scripted = _take(self.faults.token_script)
        if scripted is not None:
            return _scripted(scripted)
        if self.faults.token_answers:
            return web.json_response(self.faults.token_answers.popleft())
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type")
        if form.get("client_assertion_type") == JWT_BEARER:
            authenticated = self._assertion_valid(
                str(form.get("client_assertion", "")), str(request.url)
            )
        else:
            client_id, client_secret = basic_credentials(request.headers.get("Authorization", ""))
            if client_id is None:
                client_id = str(form.get("client_id", "")) or None
                client_secret = str(form.get("client_secret", ""))
            authenticated = client_id == self.client_id and secrets.compare_digest(
                client_secret or "", self.client_secret
            )
        if not authenticated:
            return _oauth_error(401, "invalid_client")
        token = secrets.token_urlsafe(24)
        self.tokens[token] = time.time() + self.token_ttl_s
        return web.json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self.token_ttl_s,
                "scope": form.get("scope", ""),
            }
        )

    def _assertion_valid(self, assertion: str, token_url: str) -> bool:
        """A client assertion signed by the client's key, for us, not expired (RFC 7523)."""
        if self.client_public_key is None:
            return False
        try:
            claims = jwt.decode(assertion, RSAKey.import_key(self.client_public_key)).claims
        except (JoseError, ValueError):
            return False
        return (
            claims.get("iss") == claims.get("sub") == self.client_id
            and claims.get("aud") == token_url
            and float(claims.get("exp", 0)) > time.time()
        )

    # -- Caliper endpoint ------------------------------------------------------------------

    async def _events(self, request: web.Request) -> web.StreamResponse:
        f = self.faults
        started = time.monotonic()
        self.requests_arrived += 1
        headers: dict[str, str] = {}
        if started < f.outage_until:
            status, body = 0, None
        elif f.web_filter:
            self.statuses[200] += 1
            return web.Response(text=WEB_FILTER_PAGE, content_type="text/html")
        elif f.huge_answers > 0:
            f.huge_answers -= 1
            return await self._endless(request)
        elif f.capacity and self.at_once >= f.capacity + f.capacity_queue:
            status, body, headers = 429, {"error": "too many requests"}, {"Retry-After": "1"}
        else:
            self.at_once += 1
            self.most_at_once = max(self.most_at_once, self.at_once)
            try:
                await self._turn()
                try:
                    if f.latency_s:
                        await asyncio.sleep(f.latency_s)
                    status, body, headers = await self._check(request)
                finally:
                    self._next_turn()
            finally:
                self.at_once -= 1
        self.statuses[status] += 1
        if self.request_log is not None:
            self.request_log.append((started, time.monotonic(), status))
        if status == 0:
            return _drop(request)
        if isinstance(body, ScriptedFault):
            return web.Response(
                text=body.text, status=status, headers=headers, content_type=body.content_type
            )
        return web.json_response(body, status=status, headers=headers)

    async def _turn(self) -> None:
        """Wait until one of `faults.capacity` is free (at once without a capacity)."""
        if self.faults.capacity and self._serving >= self.faults.capacity:
            turn = asyncio.get_running_loop().create_future()
            self._turns.append(turn)
            try:
                await turn  # the request that ends hands its place over
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._next_turn()  # handed over as the client went: pass it on
                raise
            return
        self._serving += 1

    def _next_turn(self) -> None:
        """A request was served: its place goes to the next one waiting, if any."""
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._serving -= 1

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        expiry = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        return expiry is not None and expiry > time.time()

    async def _check(self, request: web.Request) -> tuple[int, Any, dict[str, str]]:
        """Decide the answer: (status, JSON body, headers); status 0 drops the connection."""
        f = self.faults
        if not self._authorized(request):
            return 401, {"error": "invalid_token"}, {"WWW-Authenticate": "Bearer"}
        if request.content_type != "application/json":
            return 415, {"error": f"unsupported content type {request.content_type}"}, {}
        if f.chaos_rate and f.rng.random() < f.chaos_rate:
            return await self._chaos()
        scripted = _take(f.script)
        if scripted is not None:
            headers = {"Retry-After": scripted.retry_after} if scripted.retry_after else {}
            if scripted.text is not None:
                return scripted.status, scripted, headers
            body = {"error": "injected fault"} if scripted.body is None else scripted.body
            return scripted.status, body, headers
        if f.refuse_all is not None:
            return f.refuse_all[0], f.refuse_all[1], {}
        try:
            raw = await request.read()
        except ConnectionError:  # the sender died mid-request
            return 0, None, {}
        if f.max_envelope_bytes is not None and len(raw) > f.max_envelope_bytes:
            return 413, {"error": f"payload larger than {f.max_envelope_bytes} bytes"}, {}
        try:
            envelope = codec.loads(raw)
        except ValueError:
            return 400, {"error": "malformed JSON"}, {}
        problem = envelope_problem(envelope)
        if problem is not None:
            status = 422 if problem.startswith("unsupported dataVersion") else 400
            return status, {"error": problem}, {}
        data = envelope["data"]
        refused = [e.get("id") for e in data if e.get("id") in f.refuse_ids]
        if refused and f.refusal_status != 422:
            # Some of the envelope refused, the rest taken: what is taken is recorded.
            errors = [{"id": i, "message": "event rejected"} for i in refused]
            taken = [e for e in data if e.get("id") not in refused]
            self._record(taken, request.path, envelope["sensor"])
            return f.refusal_status, {"status": "success", "errors": errors}, {}
        if refused:
            return 422, {"error": "event rejected", "ids": refused}, {}
        if request.path == LEARNWITH_PATH:
            wrong = [e["id"] for e in data if not learnwith_form(e)]
            if wrong:
                return (
                    422,
                    {
                        "error": "TimebackProfile events are not accepted here: LearnWith.AI "
                        "takes them in AggregationProfile form",
                        "ids": wrong,
                    },
                    {},
                )
        self.max_envelope_bytes_seen = max(self.max_envelope_bytes_seen, len(raw))
        self.last_envelope = {k: v for k, v in envelope.items() if k != "data"}
        self.last_raw_envelope = raw
        self._record(data, request.path, envelope["sensor"])
        if request.path == BEYOND_PATH:
            job = FakeJob(
                secrets.token_hex(8),
                [e["id"] for e in data],
                time.monotonic(),
                [e["id"] for e in data if e["id"] in f.fail_job_ids],
                f.stuck_jobs,
                omitted=frozenset(e["id"] for e in data if e["id"] in f.job_omit_ids),
            )
            f.job_omit_ids -= job.omitted
            self.jobs[job.id] = job
            if f.omit_job_id:
                return 200, {"eventsAccepted": len(data)}, {}
            return 200, {"jobId": job.id, "eventsAccepted": len(data)}, {}
        return 200, {"status": "success", "events": len(data)}, {}

    async def _job_status(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "invalid_token"}, status=401)
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return web.json_response({"error": "job not found"}, status=404)
        job.polls += 1
        if job.polls <= self.faults.job_lag_polls:
            return web.json_response({"error": "job not found"}, status=404)
        return web.json_response({"job": job.document(self.faults.job_delay_s)})

    async def _read_fault(self, request: web.Request) -> web.StreamResponse | None:
        """Record a listing read; what it meets (a dropped connection during an outage, a
        scripted answer), or None, once `reads_open` lets it through."""
        self.reads.append(request.raw_path)
        await self.faults.reads_open.wait()
        if time.monotonic() < self.faults.outage_until:
            return _drop(request)
        scripted = _take(self.faults.read_script)
        return None if scripted is None else _scripted(scripted)

    async def _stored_events(self, request: web.Request) -> web.StreamResponse:
        """Beyond AI's `GET /caliper/events`: the events it stored, a page at a time
        (`limit`, `offset`; filtered by `sensor`, `actorId`, and `startDate`/`endDate` on
        `eventTime`)."""
        fault = await self._read_fault(request)
        if fault is not None:
            return fault
        if not self._authorized(request):
            return web.json_response({"error": "invalid_token"}, status=401)
        try:
            limit = int(request.query.get("limit", "100"))
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            return web.json_response({"error": "limit and offset must be integers"}, status=400)
        stored = [self._stored(i, event_id) for i, event_id in enumerate(self.order)]
        for key, field_name in (("sensor", "sensor"), ("actorId", "actor")):
            if key in request.query:
                stored = [e for e in stored if _entity_id(e.get(field_name)) == request.query[key]]
        try:
            since, until = (_moment(request.query.get(k)) for k in ("startDate", "endDate"))
        except ValueError:
            return web.json_response(
                {"error": "startDate and endDate must be ISO 8601 times"}, status=400
            )
        if since is not None or until is not None:
            # Both bounds inclusive, on the event's own time.
            stored = [e for e in stored if _within(e["eventTime"], since, until)]
        page = stored[offset : offset + limit]
        pages = -(-len(stored) // limit) if limit > 0 else 0
        return web.json_response(
            {
                "events": page,
                "pagination": {
                    "total": len(stored),
                    "totalPages": pages,
                    "currentPage": offset // limit + 1 if limit > 0 else 1,
                    "limit": limit,
                },
            }
        )

    async def _stored_event(self, request: web.Request) -> web.StreamResponse:
        """Beyond AI's `GET /caliper/events/{externalId}`."""
        fault = await self._read_fault(request)
        if fault is not None:
            return fault
        if not self._authorized(request):
            return web.json_response({"error": "invalid_token"}, status=401)
        event_id = request.match_info["id"]
        if event_id not in self.received:
            return web.json_response({"error": f"Event not found: {event_id}"}, status=404)
        return web.json_response({"event": self._stored(self.order.index(event_id), event_id)})

    def _stored(self, index: int, event_id: str) -> dict[str, Any]:
        """An event as the platform lists it (the SDK's `StoredEvent`)."""
        event = self.received.get(event_id, {})
        stored = {
            "id": index + 1,
            "externalId": event_id,
            "sensor": self.sensors.get(event_id, ""),
            "type": event.get("type", ""),
            "profile": event.get("profile"),
            "action": event.get("action", ""),
            "eventTime": event.get("eventTime", ""),
            "sendTime": event.get("eventTime", ""),
            "created_at": "2024-01-15T10:00:00.000Z",
        }
        for key in ("actor", "object", "generated", "edApp", "session", "extensions"):
            if key in event:
                stored[key] = event[key]
        return stored

    async def _chaos(self) -> tuple[int, Any, dict[str, str]]:
        f = self.faults
        kind = f.rng.choice(["500", "502", "503", "429", "slow", "drop"])
        if kind == "slow":
            await asyncio.sleep(f.chaos_slow_s)
            return 503, {"error": "slow"}, {}
        if kind == "drop":
            return 0, None, {}
        headers = {"Retry-After": "1"} if kind == "429" else {}
        return int(kind), {"error": f"chaos {kind}"}, headers

    def _record(self, events: list[dict[str, Any]], path: str, sensor: str) -> None:
        self.envelopes += 1
        self.max_events_seen = max(self.max_events_seen, len(events))
        for event in events:
            if event["id"] in self.received:
                self.duplicates += 1
            elif event["id"] in self.faults.lose_ids or (
                self.faults.lose_rate
                and event["id"] not in self.lost
                and self.faults.lose_rng.random() < self.faults.lose_rate
            ):
                self.lost.add(event["id"])
                self.lost_arrivals[event["id"]] += 1
            else:
                self.received[event["id"]] = event if self.keep_events else _NOT_KEPT
                if self.keep_events:
                    self.arrived_via[event["id"]] = path
                    self.sensors[event["id"]] = sensor
                self.order.append(event["id"])
        self.arrived.set()

    # -- control ---------------------------------------------------------------------------

    async def _list_events(self, request: web.Request) -> web.Response:
        """What arrived; `?ids=false` leaves out the ids (cheap to poll during a benchmark)."""
        summary: dict[str, Any] = {
            "count": len(self.received),
            "duplicates": self.duplicates,
            "envelopes": self.envelopes,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "most_at_once": self.most_at_once,
        }
        if request.query.get("ids") != "false":
            summary["ids"] = self.order
        return web.json_response(summary)

    async def _set_faults(self, request: web.Request) -> web.Response:
        """Set faults over HTTP: fail_next {status, times, retry_after, body, text,
        content_type}, latency_ms, capacity and capacity_queue, refuse_ids and refusal_status
        (422, 207 or 200), refuse_all [status, body] (or null), web_filter (true: an HTML 200
        page answers for the platform), outage_s, chaos_rate, lose_rate (the share of events
        answered as taken and lost), lose_ids (events lost however often sent),
        revoke_tokens, and for Beyond AI omit_job_id and its jobs'
        fail_job_ids, job_omit_ids, job_delay_ms, stuck_jobs, job_lag_polls."""
        body = await request.json()
        f = self.faults
        if "fail_next" in body:
            self.fail_next(**body["fail_next"])
        if "latency_ms" in body:
            f.latency_s = float(body["latency_ms"]) / 1000
        if "capacity" in body:
            f.capacity = int(body["capacity"])
        if "capacity_queue" in body:
            f.capacity_queue = int(body["capacity_queue"])
        if "refuse_ids" in body:
            f.refuse_ids = set(body["refuse_ids"])
        if "outage_s" in body:
            self.outage(float(body["outage_s"]))
        if "chaos_rate" in body:
            f.chaos_rate = float(body["chaos_rate"])
        if "lose_rate" in body:
            f.lose_rate = float(body["lose_rate"])
        if "lose_ids" in body:
            f.lose_ids = set(body["lose_ids"])
        if body.get("revoke_tokens"):
            self.revoke_tokens()
        if "fail_job_ids" in body:
            f.fail_job_ids = set(body["fail_job_ids"])
        if "job_delay_ms" in body:
            f.job_delay_s = float(body["job_delay_ms"]) / 1000
        if "stuck_jobs" in body:
            f.stuck_jobs = bool(body["stuck_jobs"])
        if "job_lag_polls" in body:
            f.job_lag_polls = int(body["job_lag_polls"])
        if "omit_job_id" in body:
            f.omit_job_id = bool(body["omit_job_id"])
        if "refusal_status" in body:
            f.refusal_status = int(body["refusal_status"])
        if "web_filter" in body:
            f.web_filter = bool(body["web_filter"])
        if "job_omit_ids" in body:
            f.job_omit_ids = set(body["job_omit_ids"])
        if "refuse_all" in body:
            refusal = body["refuse_all"]
            f.refuse_all = None if refusal is None else (int(refusal[0]), refusal[1])
        return web.json_response({"ok": True})

    async def _wipe(self, request: web.Request) -> web.Response:
        """`POST /_mock/wipe`: forget every event held (`wipe`)."""
        self.wipe()
        return web.json_response({"ok": True})

    async def _alive(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})


def envelope_problem(envelope: Any) -> str | None:
    """Why this is not a Caliper 1.2 envelope the platform accepts, or None."""
    if not isinstance(envelope, dict):
        return "the body is not a JSON object"
    keys = set(envelope)
    if keys != ENVELOPE_KEYS:
        return f"envelope keys must be exactly {sorted(ENVELOPE_KEYS)}; got {sorted(keys)}"
    if not isinstance(envelope["sensor"], str) or not envelope["sensor"]:
        return "sensor must be a non-empty string"
    if not isinstance(envelope["sendTime"], str) or not SEND_TIME.fullmatch(envelope["sendTime"]):
        return "sendTime must be a UTC time with milliseconds (2024-01-15T10:07:30.000Z)"
    if envelope["dataVersion"] != DATA_VERSION:
        return f"unsupported dataVersion {envelope['dataVersion']!r}"
    data = envelope["data"]
    if not isinstance(data, list) or not data:
        return "data must be a non-empty array"
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return "every data item must be an object with a string id"
    return None


def learnwith_form(event: dict[str, Any]) -> bool:
    """Whether LearnWith.AI takes this event: TimeBack's profile only in its own form, whose
    metrics each name their type and carry a value."""
    actor = event.get("actor")
    if event.get("profile") == "TimebackProfile" or (
        isinstance(actor, dict) and actor.get("type") == "TimebackUser"
    ):
        return False
    generated = event.get("generated")
    items = generated.get("items") if isinstance(generated, dict) else None
    return not isinstance(items, list) or all(
        isinstance(item, dict)
        and isinstance(item.get("metricValue"), int | float)
        and item.get("metricType") not in (None, "", "ActivityMetric", "TimeSpentMetric")
        for item in items
        if isinstance(item, dict) and item.get("type") in ("ActivityMetric", "TimeSpentMetric")
    )


def _moment(text: str | None) -> datetime | None:
    """An ISO 8601 time (a date alone is its midnight, UTC), or None; raises ValueError."""
    if not text:
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _within(event_time: str, since: datetime | None, until: datetime | None) -> bool:
    """Whether an event's time is in the range (one that does not read is in none)."""
    try:
        moment = _moment(event_time)
    except ValueError:
        return False
    if moment is None:
        return False
    return (since is None or moment >= since) and (until is None or moment <= until)


def _entity_id(entity: Any) -> Any:
    return entity.get("id") if isinstance(entity, dict) else entity


def _opened(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


def _take(script: deque[ScriptedFault]) -> ScriptedFault | None:
    if not script:
        return None
    fault = script[0]
    fault.times -= 1
    if fault.times <= 0:
        script.popleft()
    return fault


def _scripted(fault: ScriptedFault) -> web.Response:
    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
    body = {"error": "injected fault"} if fault.body is None else fault.body
    return web.json_response(body, status=fault.status, headers=headers)


def _drop(request: web.Request) -> web.StreamResponse:
    # Close the connection without an answer, as a dead load balancer would.
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=503)


def _oauth_error(status: int, error: str) -> web.Response:
    return web.json_response({"error": error}, status=status)


@dataclass
class RunningFake:
    """A fake TimeBack listening on a port, with the URLs a sidecar needs."""

    fake: FakeTimeBack
    runner: web.AppRunner
    base_url: str

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    @property
    def events_url(self) -> str:
        return self.base_url + EVENTS_PATH

    @property
    def learnwith_url(self) -> str:
        """LearnWith.AI's Caliper endpoint."""
        return self.base_url + LEARNWITH_PATH

    @property
    def beyond_url(self) -> str:
        """Beyond AI's Caliper endpoint."""
        return self.base_url + BEYOND_PATH

    @property
    def jobs_url(self) -> str:
        """Beyond AI's job status, with `{id}` where the job id goes."""
        return self.base_url + JOBS_PATH

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_fake(
    fake: FakeTimeBack | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningFake:
    """Serve a fake TimeBack; port 0 picks a free one."""
    fake = fake or FakeTimeBack()
    runner = web.AppRunner(fake.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_host, bound_port = runner.addresses[0][:2]
    return RunningFake(fake, runner, f"http://{bound_host}:{bound_port}")


async def serve_fake(fake: FakeTimeBack, host: str, port: int) -> None:
    """`caliper-sidecar mock-upstream`: serve until SIGTERM or SIGINT, saying where. The
    signals are taken before it listens: one sent while it starts stops it, never kills it."""
    with StopSignals() as signals:
        await _serve_fake(fake, host, port, signals.stop)


async def _serve_fake(fake: FakeTimeBack, host: str, port: int, stop: asyncio.Event) -> None:
    running = await start_fake(fake, host, port)
    print(
        f"fake TimeBack listening on {running.base_url}\n"
        f"  token endpoint     {running.token_url}  (client_id={fake.client_id!r}, "
        f"client_secret={fake.client_secret!r})\n"
        f"  LearnWith.AI       {running.learnwith_url}\n"
        f"  Beyond AI          {running.beyond_url}  (jobs: {running.jobs_url})\n"
        f"  older events API   {running.events_url}\n"
        f"  received events    GET {running.base_url}/_mock/events\n"
        f"  inject faults      POST {running.base_url}/_mock/faults\n"
        f"  forget every event POST {running.base_url}/_mock/wipe\n"
        "Point a sidecar at it as Beyond AI with:\n"
        f"  SIDECAR_UPSTREAM_ENDPOINT={running.beyond_url} "
        f"SIDECAR_UPSTREAM_JOBS_URL='{running.jobs_url}' \\\n"
        f"  SIDECAR_OAUTH_TOKEN_URL={running.token_url} "
        f"SIDECAR_OAUTH_CLIENT_ID={fake.client_id} "
        f"SIDECAR_OAUTH_CLIENT_SECRET={fake.client_secret} caliper-sidecar run\n"
        f"(or as LearnWith.AI: SIDECAR_UPSTREAM_ENDPOINT={running.learnwith_url}, no jobs URL)",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await running.close()
