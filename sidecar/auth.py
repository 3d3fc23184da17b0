"""Bearer tokens presented to the sidecar (by apps, by operators), checked in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from aiohttp import web


def bearer_matches(request: web.Request, tokens: Iterable[str]) -> bool:
    """True when the request's `Authorization: Bearer` token is one of these.

    Every token is compared, in constant time, whichever matches: how long the check takes
    tells nothing about the tokens.
    """
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    candidate = presented.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token.encode())
    return scheme.lower() == "bearer" and matched
