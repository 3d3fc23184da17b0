"""Bearer tokens for a destination (the upstream, or one of [[destinations]]): OAuth2 client
credentials, or a static token for chaining. Each destination has its own source: its tokens,
refreshes and expiry are never another's.

Authlib has no aiohttp client (and its httpx client mishandles client-credentials refresh), so
its transport-neutral parts do the OAuth work here: `ClientAuth` signs the token request,
`prepare_token_request` builds its body, `OAuth2Token` tracks expiry. aiohttp carries it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import structlog
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749 import OAuth2Token
from authlib.oauth2.rfc6749.parameters import prepare_token_request

from caliper_sidecar.config import OAuthSettings
from caliper_sidecar.delivery.answers import read_answer
from caliper_sidecar.delivery.backoff import parse_retry_after, transient_status
from caliper_sidecar.exceptions import AuthFailed, ConfigError, RetryLater
from caliper_sidecar.metrics import DestinationMetrics

log = structlog.get_logger("sidecar.tokens")

MAX_LIFETIME_S: Final = 365 * 86_400
_TOKEN_CHARS: Final = re.compile(r"[\x21-\x7e]+")


class TokenSource(Protocol):
    """Where the dispatcher gets the `Authorization` value for the next request."""

    async def bearer(self) -> str | None:
        """A token valid for the next request, or None when requests go without one."""

    def invalidate(self, token: str) -> None:
        """The platform refused this token: the next `bearer()` must not return it."""

    def rotate(self, oauth: OAuthSettings, bearer_token: str, timeout_s: float) -> None:
        """New secrets from the configuration (SIGHUP), used from the next request for a
        token (or, for a static one, from the next send)."""

    @property
    def expires_at(self) -> float | None:
        """When the current token expires (seconds since the epoch), if known."""


class StaticToken:
    """A fixed bearer token, or none: for a relay forwarding to another sidecar."""

    def __init__(self, token: str) -> None:
        self._token = token or None

    async def bearer(self) -> str | None:
        return self._token

    def invalidate(self, token: str) -> None:
        """A static token cannot be renewed; the caller reports the refusal."""

    def rotate(self, oauth: OAuthSettings, bearer_token: str, timeout_s: float) -> None:
        """A new token from the configuration (SIGHUP), sent from the next request on."""
        self._token = bearer_token or None

    @property
    def expires_at(self) -> float | None:
        return None


def token_source(
    session: aiohttp.ClientSession,
    oauth: OAuthSettings,
    bearer_token: str,
    timeout_s: float,
    metrics: DestinationMetrics,
) -> TokenSource:
    """A destination's tokens: OAuth client credentials when its `oauth.token_url` is set,
    else its static `bearer_token` (or none)."""
    if oauth.token_url:
        return OAuthTokens(session, oauth, timeout_s, metrics)
    return StaticToken(bearer_token)


class OAuthTokens:
    """OAuth2 client-credentials tokens, cached and refreshed ahead of expiry.

    Refreshes happen `refresh_leeway_s` before expiry, but never later than half-way through
    a short-lived token, and one at a time: however many senders ask during a refresh, one
    request reaches the token endpoint and all of them get its answer.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: OAuthSettings,
        timeout_s: float,
        metrics: DestinationMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        #: the wall clock expiries are reckoned by (tests give one they move by hand)
        self._clock = clock
        self._expires_at: float | None = None
        self._session = session
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._refreshes = metrics.token_refreshes  # exported at 0 from now on
        self._destination = metrics.name
        self._auth = _client_auth(settings)
        self._token: OAuth2Token | None = None
        self._leeway = settings.refresh_leeway_s
        self._lock = asyncio.Lock()

    @property
    def expires_at(self) -> float | None:
        return None if self._token is None else self._expires_at

    async def bearer(self) -> str:
        token = self._token
        if token is None or self._due():
            async with self._lock:
                # Whoever held the lock before us may have refreshed already.
                token = self._token
                if token is None or self._due():
                    token = self._token = await self._fetch()
        return str(token["access_token"])

    def invalidate(self, token: str) -> None:
        if self._token is not None and self._token.get("access_token") == token:
            self._token = None

    def rotate(self, oauth: OAuthSettings, bearer_token: str, timeout_s: float) -> None:
        """New credentials from the configuration (SIGHUP: a rotated client secret or private
        key): the next token request uses them; the token held stays while it is good. Raises
        ConfigError, changing nothing, when the new private key cannot be read."""
        auth = _client_auth(oauth)
        self._settings, self._auth = oauth, auth
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    def _due(self) -> bool:
        return self._expires_at is not None and self._clock() >= self._expires_at - self._leeway

    async def _fetch(self) -> OAuth2Token:
        s = self._settings
        params: dict[str, Any] = {"scope": s.scope} if s.scope else {}
        body = prepare_token_request("client_credentials", **params)
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        url, headers, body = self._auth.prepare("POST", s.token_url, headers, body)
        started = time.monotonic()
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                text = await read_answer(resp)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                payload = _json_object(text) or {}
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryLater(f"token endpoint unreachable: {type(e).__name__} {e}") from e
        if status == 200 and not _sendable(payload.get("access_token")):
            # A token that cannot go in a header (a line break…) would fail every send.
            raise RetryLater("token endpoint answered a token that cannot be sent in a header")
        if status != 200 or not isinstance(payload.get("access_token"), str):
            error = payload.get("error", "")
            reason = f"token endpoint answered HTTP {status}" + (f" ({error})" if error else "")
            if transient_status(status) or status == 200:
                raise RetryLater(reason, retry_after)
            # invalid_client, a wrong URL, a refused scope: no retry fixes these, an operator
            # does. The events wait, and the state says auth_failed.
            raise AuthFailed(reason)
        lifetime = _lifetime(payload)
        payload.pop("expires_at", None)  # recomputed from expires_in: ours is the clock
        if lifetime is not None:
            payload["expires_in"] = lifetime
        token = OAuth2Token(payload)
        self._expires_at = self._clock() + lifetime if lifetime else None
        # A short-lived token is renewed half-way through, whatever the configured leeway.
        self._leeway = min(self._settings.refresh_leeway_s, lifetime / 2) if lifetime else 0
        self._refreshes.inc()
        log.info(
            "token_refreshed",
            destination=self._destination,
            expires_in=lifetime,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return token


def _lifetime(payload: dict[str, Any]) -> int | None:
    """Seconds the token lives, within sense: at most a year (an endpoint answering 1e12 or
    Infinity would otherwise break every time computed from it)."""
    try:
        seconds = float(payload["expires_in"])
    except (KeyError, TypeError, ValueError):
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return int(min(seconds, MAX_LIFETIME_S))


def _sendable(token: Any) -> bool:
    """A token that can be sent as `Authorization: Bearer <token>` (RFC 6750's characters)."""
    return isinstance(token, str) and bool(_TOKEN_CHARS.fullmatch(token))


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _client_auth(s: OAuthSettings) -> ClientAuth:
    if s.auth_method == "private_key_jwt":
        from authlib.oauth2.rfc7523 import PrivateKeyJWT

        try:
            key = Path(s.private_key_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"oauth.private_key_file cannot be read: {e.strerror}") from None
        return ClientAuth(s.client_id, key, PrivateKeyJWT(s.token_url))
    return ClientAuth(s.client_id, s.client_secret, s.auth_method)
