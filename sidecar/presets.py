"""Named upstream presets: the TimeBack endpoints an operator would otherwise type by hand.

The values come from TimeBack's public documentation (late 2026). The platform has more than one
ingestion API, so every value is a default that an operator confirms with their TimeBack
onboarding; each one can be overridden by setting the key itself.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

_CALIPER_WRITE_SCOPE: Final = "https://purl.imsglobal.org/spec/caliper/v1p2/scope/events.write"


def _timeback(base: str) -> MappingProxyType[tuple[str, str], str]:
    return MappingProxyType(
        {
            ("upstream", "endpoint"): f"{base}/events/1.0/",
            ("oauth", "token_url"): f"{base}/auth/1.0/token",
            ("oauth", "scope"): _CALIPER_WRITE_SCOPE,
            ("oauth", "auth_method"): "client_secret_basic",
        }
    )


#: preset name -> {(section, key): value}; applied only to keys the operator did not set.
PRESETS: Final[MappingProxyType[str, MappingProxyType[tuple[str, str], str]]] = MappingProxyType(
    {
        "timeback": _timeback("https://platform.timeback.com"),
        "timeback-staging": _timeback("https://platform.dev.timeback.com"),
        "timeback-sandbox": _timeback("https://sandbox.platform.timeback.com"),
    }
)
