"""Bearer tokens presented to the sidecar (by apps, by operators), checked in constant time, and
the access tokens the sidecar issues to apps on its own token endpoint.

An issued token is signed (HMAC-SHA256) with the sender token that was the client secret of its
request, and carries its expiry: nothing is stored, so it stays valid across a restart, and it
stops working as soon as that sender token is removed from `receiver.tokens`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Final

from aiohttp import web

ISSUED_PREFIX: Final = "cs1"
ISSUED_TTL_S: Final = 3600
#: the longest token this sidecar issues is about 70 characters; anything far longer is forged,
#: and is refused before any parsing or arithmetic
MAX_ISSUED_TOKEN: Final = 256
#: digits of an expiry: Unix seconds until the year 33658
_EXPIRY_DIGITS: Final = 12
#: signs the tokens issued when no sender tokens are set (they are then never checked)
_OPEN_KEY: Final = "caliper-sidecar: receiver.tokens is empty"


def presented_token(request: web.Request) -> bytes | None:
    """The token of an `Authorization: Bearer` header, as bytes (whatever bytes the header
    held: a header that is not UTF-8 is compared, not decoded), or None."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = presented.strip().encode("utf-8", "surrogateescape")
    return token or None


def matching_token(candidate: bytes, tokens: Iterable[str]) -> str | None:
    """Which of these tokens the candidate is, or None.

    Every token is compared, in constant time, whichever matches: how long the check takes
    tells nothing about the tokens. A blank token matches nothing.
    """
    matched = None
    for token in tokens:
        if hmac.compare_digest(candidate, token.encode()) and token:
            matched = token
    return matched if candidate else None


def _bearer_of(request: web.Request, tokens: Iterable[str]) -> str | None:
    """Which of these tokens the request's `Authorization: Bearer` presents, or None."""
    return matching_token(presented_token(request) or b"", tokens)


def bearer_matches(request: web.Request, tokens: Iterable[str]) -> bool:
    """True when the request's `Authorization: Bearer` token is one of these."""
    return _bearer_of(request, tokens) is not None


def sending_token(request: web.Request, tokens: Sequence[str]) -> str | None:
    """The sender token a request sends with: one it presents, or the one that signed the
    token this sidecar issued it; None when it presents neither."""
    matched = _bearer_of(request, tokens)
    if matched is not None:
        return matched
    candidate = presented_token(request)
    return None if candidate is None else issued_for(candidate, tokens)


def sender_allowed(request: web.Request, tokens: Sequence[str]) -> bool:
    """May this request send events? Always when no sender tokens are set; otherwise when it
    presents one of them, or a token this sidecar issued for one of them."""
    return not tokens or sending_token(request, tokens) is not None


def sender_label(token: str | None) -> str:
    """What names a sender in logs, metrics and journeys: its token's label in
    `receiver.tokens_file`, or "" (a token without a label, or no tokens at all)."""
    return getattr(token, "label", None) or ""


def issue_token(secret: str | None, now: float | None = None) -> str:
    """An access token for an app whose client secret was `secret` (None: no tokens are set)."""
    expires = int((now or time.time()) + ISSUED_TTL_S)
    claims = f"{ISSUED_PREFIX}.{expires}.{secrets.token_urlsafe(12)}"
    return f"{claims}.{_mac(secret or _OPEN_KEY, claims)}"


def issued_for(token: bytes, secrets_: Sequence[str], now: float | None = None) -> str | None:
    """The sender token an unexpired issued token was issued for, or None. A token of any size
    and shape is only ever refused: bounded before it is parsed, its expiry read only when it
    is a short run of ASCII digits (int() of 5,000 digits raises, and was a 500)."""
    if len(token) > MAX_ISSUED_TOKEN or not token.isascii():
        return None
    text = token.decode("ascii")
    claims, _, mac = text.rpartition(".")
    prefix, _, rest = claims.partition(".")
    expires, _, _ = rest.partition(".")
    if (
        prefix != ISSUED_PREFIX
        or not 0 < len(expires) <= _EXPIRY_DIGITS
        or not all("0" <= c <= "9" for c in expires)
        or int(expires) <= (now or time.time())
    ):
        return None
    matched = None
    for secret in secrets_:  # every one, whichever matches
        if hmac.compare_digest(mac, _mac(secret, claims)):
            matched = secret
    return matched


def _mac(key: str, claims: str) -> str:
    digest = hmac.new(key.encode(), claims.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


#: failed token requests an address may make within FAILURE_WINDOW_S before it is slowed down
TOKEN_FAILURES_ALLOWED: Final = 10
FAILURE_WINDOW_S: Final = 60.0
#: addresses remembered at most (the oldest forgotten first): memory stays bounded whatever
#: many addresses try
FAILING_ADDRESSES: Final = 10_000


class FailedTokenRequests:
    """Token requests refused, by client address: an address that keeps failing is slowed down
    (answered 429 without its secret being checked) until its failures age out of the window.
    On the monotonic clock, so a wall-clock step neither frees nor blocks anyone."""

    def __init__(self) -> None:
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> int | None:
        """Seconds this address must wait before it may try again, or None."""
        failures = self._recent(address)
        if failures is None or len(failures) < TOKEN_FAILURES_ALLOWED:
            return None
        return max(1, math.ceil(failures[0] + FAILURE_WINDOW_S - time.monotonic()))

    def failed(self, address: str) -> None:
        failures = self._recent(address) or deque(maxlen=TOKEN_FAILURES_ALLOWED)
        failures.append(time.monotonic())
        self._failures[address] = failures
        self._failures.move_to_end(address)
        while len(self._failures) > FAILING_ADDRESSES:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _recent(self, address: str) -> deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        cutoff = time.monotonic() - FAILURE_WINDOW_S
        while failures and failures[0] < cutoff:
            failures.popleft()
        return failures


def basic_credentials(header: str) -> tuple[str | None, str | None]:
    """The client id and secret of an `Authorization: Basic …` header (RFC 7617); (None, None)
    when it is not one, or does not decode."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    client_id, _, secret = decoded.partition(":")
    return client_id, secret
