"""The HTTP call to a Caliper endpoint (the upstream's, or a `caliper` destination's), and what
its answer means.

`UpstreamClient.send` returns when the platform accepted the envelope and otherwise raises the
outcome the dispatcher acts on: RetryLater (transient; EndpointFailed when the endpoint itself
fails), Refused (this batch is refused), AuthFailed.

A 2xx is delivery only when it is the destination's answer (`read_acceptance`): a school's web
filter, a captive portal or a TLS-inspecting proxy answers `200 text/html` in the platform's
place, and taking that at its word would erase every event's body (UnexpectedAnswer). TimeBack's
APIs answer `200 {"status": "error", …}` when they refuse, a 207 or a 2xx listing `errors` says
some events were refused: each is read as the refusal of the batch it is. A 404, 405 or 410
says nothing about the events (a mistyped endpoint, a maintenance page, a proxy without the
route): read as such, they would dead-letter a whole backlog at full speed.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import quote

import aiohttp

from caliper_sidecar import codec
from caliper_sidecar.config import DestinationSettings, UpstreamSettings
from caliper_sidecar.delivery.answers import exchange
from caliper_sidecar.delivery.backoff import transient_status
from caliper_sidecar.delivery.learnwith_form import rewrite_body
from caliper_sidecar.delivery.tokens import TokenSource, token_source
from caliper_sidecar.envelope import build_envelope, envelope_overhead
from caliper_sidecar.exceptions import (
    AuthFailed,
    EndpointFailed,
    Refused,
    RetryLater,
    UnexpectedAnswer,
)
from caliper_sidecar.metrics import DestinationMetrics, Metrics

RESPONSE_KEPT: Final = 1024  # bytes of a refusal kept with the dead letter
#: statuses that say the endpoint is wrong or gone, not that these events are
ENDPOINT_FAILURES: Final = frozenset({404, 405, 410})
#: platforms that answer a JSON object saying `success` (TimeBack's); any other Caliper
#: endpoint may answer an empty body (IMS recommends it) or JSON
ANSWER_OBJECTS: Final = frozenset({"learnwith-ai", "beyond-ai"})
#: Beyond AI's documented answer (the SDK's SendEventsResult) has no `status`, only these
ACCEPTANCE_KEYS: Final = ("jobId", "eventsAccepted")


@dataclass(frozen=True, slots=True)
class Sent:
    """The destination took a batch: the HTTP status of its answer (None for an archive, which
    answers nothing), and the processing job it opened (when jobs are followed and the answer
    named one). `unconfirmed` says why the events cannot be confirmed although jobs are
    followed (the answer named no job)."""

    status: int | None
    job_id: str | None = None
    unconfirmed: str | None = None


class Sender(Protocol):
    """What delivery needs of a destination: the UpstreamClient over HTTP, the archive's files
    (archive_sender.py), or in tests a scripted stand-in that answers as a test says (the
    dispatcher's split, backoff and dead-letter logic and the job follower run against any)."""

    #: bytes an envelope adds around its events (batches are sized to leave room for it)
    overhead: int

    async def send(
        self,
        bodies: Sequence[bytes],
        sensor: str | None = None,
        received_at: Sequence[float] = (),
    ) -> Sent:
        """Deliver these events (`received_at`: when the sidecar received each, for a sender
        that files them by it); return when the destination took them, else raise the outcome
        (RetryLater, Refused, AuthFailed)."""


class JobStatuses(Protocol):
    """What following the platform's jobs needs of it (confirmations.py): the UpstreamClient
    of a platform with jobs, or in tests a scripted stand-in. An archive has none."""

    async def job_status(self, job_id: str) -> dict[str, Any]: ...


def delivery_session() -> aiohttp.ClientSession:
    """The connections one destination's delivery uses, and no other's. The caller closes it.

    Not limited here: what uses them is, and a SIGHUP may raise `concurrency`, which a fixed
    pool would silently cap. Sends are at most the dispatcher's `concurrency` (its slots),
    token requests one at a time, job polls confirmations.CONCURRENT_POLLS."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        headers={"User-Agent": "caliper-sidecar"},
    )


def default_sensor() -> str:
    """The envelope's `sensor` when none is configured: stable for this host."""
    return f"urn:caliper-sidecar:{socket.gethostname()}"


class UpstreamClient:
    """Posts envelopes to a Caliper endpoint with a bearer token: [upstream]'s (its platform
    decides the form events leave in and how answers read; it may follow jobs), or a `caliper`
    destination's (`for_destination`: any Caliper endpoint, events unchanged, no jobs)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: UpstreamSettings | DestinationSettings,
        tokens: TokenSource,
        metrics: DestinationMetrics,
    ) -> None:
        if isinstance(settings, UpstreamSettings):
            platform, self._jobs_url = settings.platform, settings.jobs_url
            #: the key an operator fixes when the endpoint is wrong
            self._endpoint_key = "upstream.endpoint"
        else:
            platform, self._jobs_url = "caliper", ""
            self._endpoint_key = f"the endpoint of destination {settings.name}"
        self._session = session
        self._endpoint = settings.endpoint
        self._learnwith_form = platform == "learnwith-ai"
        self._answers_objects = platform in ANSWER_OBJECTS
        self.sensor = settings.sensor or default_sensor()
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._tokens = tokens
        self._requests = metrics.upstream_requests
        self._seconds = metrics.upstream_seconds  # exported from now on, at 0
        #: bytes the envelope adds around its events, for the batch size limit
        self.overhead = envelope_overhead(self.sensor)

    @classmethod
    def for_destination(
        cls,
        session: aiohttp.ClientSession,
        settings: DestinationSettings,
        metrics: Metrics,
    ) -> UpstreamClient:
        """The client of a `caliper` destination: its endpoint, its sensor (config.py gave it
        upstream.sensor when it has none; else this host's), its `bearer_token` or the OAuth
        client credentials of its own `oauth` table (tokens and refreshes of its own), its
        `timeout_s`; counted under its name. Give it a session of its own (`delivery_session`):
        a slow destination then never holds the connections another one waits for."""
        if settings.kind != "caliper":
            raise ValueError(f"destination {settings.name!r} is a {settings.kind}, not caliper")
        counted = metrics.for_destination(settings.name)
        tokens = token_source(
            session, settings.oauth, settings.bearer_token, settings.timeout_s, counted
        )
        return cls(session, settings, tokens, counted)

    def retune(self, timeout_s: float) -> None:
        """A new `timeout_s` (SIGHUP), for the next requests."""
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    @property
    def tokens(self) -> TokenSource:
        """Where this client's bearer tokens come from (their expiry is in the status)."""
        return self._tokens

    @property
    def follows_jobs(self) -> bool:
        return bool(self._jobs_url)

    async def send(
        self,
        bodies: Sequence[bytes],
        sensor: str | None = None,
        received_at: Sequence[float] = (),
    ) -> Sent:
        """Send one envelope of these serialized events, under the sensor of the app that sent
        them (or the configured one); returns when the platform took it. An envelope carries
        no receive times: `received_at` is unused."""
        del received_at
        if self._learnwith_form:
            bodies = [rewrite_body(body) for body in bodies]
        envelope = build_envelope(sensor or self.sensor, bodies)
        status, retry_after, text = await self._authorized("POST", self._endpoint, envelope)
        if 200 <= status < 300:
            answer = read_acceptance(status, text, objects_only=self._answers_objects)
            if not self._jobs_url:
                return Sent(status)
            job = answer.get("jobId")
            if isinstance(job, str) and job:
                return Sent(status, job)
            return Sent(status, unconfirmed=f"HTTP {status} without a jobId: {text[:200]}")
        if status == 409 and len(bodies) == 1:
            # The platform already holds this id: what was to be done is done.
            return Sent(status)
        if status in (401, 403):
            raise AuthFailed(f"Caliper endpoint answered HTTP {status}: {text[:200]}")
        if status in ENDPOINT_FAILURES:
            raise EndpointFailed(
                f"Caliper endpoint answered HTTP {status} (is {self._endpoint_key} right?): "
                f"{text[:200]}",
                retry_after,
            )
        if transient_status(status):
            raise RetryLater(f"Caliper endpoint answered HTTP {status}", retry_after)
        if 400 <= status < 500:
            raise Refused(status, text[:RESPONSE_KEPT])
        # 1xx/3xx: a misconfigured endpoint or proxy, not a verdict on these events.
        raise RetryLater(f"Caliper endpoint answered unexpected HTTP {status}")

    async def job_status(self, job_id: str) -> dict[str, Any]:
        """The platform's word on one of its processing jobs: the `job` object of its answer.

        Raises RetryLater (not readable now), AuthFailed, or Refused (the platform does not
        know the job, or will never answer for it).
        """
        url = self._jobs_url.replace("{id}", quote(job_id, safe=""))
        status, retry_after, text = await self._authorized("GET", url, None)
        if status in (401, 403):
            raise AuthFailed(f"jobs endpoint answered HTTP {status}: {text[:200]}")
        if transient_status(status):
            raise RetryLater(f"jobs endpoint answered HTTP {status}", retry_after)
        if status != 200:
            raise Refused(status, text[:RESPONSE_KEPT])
        try:
            answer = codec.loads(text.encode())
        except ValueError:
            raise RetryLater("jobs endpoint answered with something that is not JSON") from None
        job = answer.get("job", answer) if isinstance(answer, dict) else None
        if not isinstance(job, dict):
            raise RetryLater("jobs endpoint answered without a job object")
        return job

    async def _authorized(
        self, method: str, url: str, body: bytes | None
    ) -> tuple[int, float | None, str]:
        """One request with the current token; on a 401, one fresh token and one retry (the
        token may have been revoked or expired early)."""
        token = await self._tokens.bearer()
        used = [token]
        answer = await self._request(method, url, body, token)
        if answer[0] == 401 and token is not None:
            self._tokens.invalidate(token)
            fresh = await self._tokens.bearer()
            if fresh is not None and fresh != token:
                used.append(fresh)
                answer = await self._request(method, url, body, fresh)
        status, retry_after, text = answer
        # A platform (or a proxy) may echo the request's credentials in its answer; the answer
        # is kept with dead letters and logged, the credentials must not be.
        return status, retry_after, redact(text, used)

    async def _request(
        self, method: str, url: str, body: bytes | None, token: str | None
    ) -> tuple[int, float | None, str]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await exchange(
            self._session,
            method,
            url,
            who="Caliper endpoint",
            headers=headers,
            timeout=self._timeout,
            requests=self._requests,
            seconds=self._seconds,
            body=body,
        )


_BEARER: Final = re.compile(r"(?i)(bearer\s+)[\x21-\x7e]+")


def redact(text: str, secrets: Sequence[str | None]) -> str:
    """The text without these secrets, nor anything written as `Bearer <token>`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return _BEARER.sub(r"\1<redacted>", text)


def read_acceptance(status: int, text: str, *, objects_only: bool) -> dict[str, Any]:
    """A 2xx answer as the destination's acceptance of a whole envelope: the JSON object it
    answered (empty for an empty body or other JSON, where those are acceptances).

    Raises Refused when it refuses some or all of the events (a 207; `status` other than
    `success`; a non-empty `errors` list), and UnexpectedAnswer when it is not the
    destination's answer at all: not JSON (a web filter's page), or, toward TimeBack's
    platforms (`objects_only`), not an object that says `success` or names its job.
    """
    if status == 207:
        raise Refused(status, text[:RESPONSE_KEPT])
    if not text.strip():
        if objects_only:
            raise UnexpectedAnswer(f"HTTP {status} with an empty body, not the platform's answer")
        return {}
    try:
        answer = codec.loads(text.encode())
    except (ValueError, RecursionError):
        raise UnexpectedAnswer(
            f"HTTP {status} that is not the platform's answer (a web filter, a captive portal "
            f"or a proxy?): {_start(text)}"
        ) from None
    if not isinstance(answer, dict):
        if objects_only:
            raise UnexpectedAnswer(f"HTTP {status} without a JSON object: {_start(text)}")
        return {}
    if "status" in answer and answer["status"] != "success":
        raise Refused(status, text[:RESPONSE_KEPT])
    errors = answer.get("errors")
    if isinstance(errors, list) and errors:
        raise Refused(status, text[:RESPONSE_KEPT])
    if objects_only and "status" not in answer and not any(k in answer for k in ACCEPTANCE_KEYS):
        raise UnexpectedAnswer(
            f"HTTP {status} whose JSON says neither status nor jobId: {_start(text)}"
        )
    return answer


def _start(text: str) -> str:
    """The start of an answer, on one line, for the state and the log."""
    return " ".join(text[:200].split())
