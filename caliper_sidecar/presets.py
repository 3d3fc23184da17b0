"""Named upstream presets: the TimeBack platforms as TimeBack's official SDK knows them.

The values are the SDK's (`timeback_common/config.py`, timeback-common 0.4.0). TimeBack is two
platforms: LearnWith.AI (`timeback`, `timeback-staging`, and the older `timeback-sandbox`) takes
envelopes at `/caliper/v1p2`, wants its own form of TimeBack's profile, and has no jobs; Beyond AI
(`timeback-beyond`, `timeback-beyond-staging`) takes them at `/caliper/event`, answers with a
processing job, and issues tokens from AWS Cognito. Every value is a default: an operator's own
setting of the key wins.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final, Literal, get_args

_CALIPER_WRITE_SCOPE: Final = "https://purl.imsglobal.org/spec/caliper/v1p2/scope/events.write"
_COGNITO: Final = "https://{}-beyond-timeback-api-2-idp.auth.us-east-1.amazoncognito.com"

Preset = MappingProxyType[tuple[str, str], str]

#: the platforms events can be sent to (`upstream.platform`)
Platform = Literal["learnwith-ai", "beyond-ai", "caliper"]
#: the path of each platform's Caliper endpoint (None: any)
PLATFORMS: Final[MappingProxyType[str, str | None]] = MappingProxyType(
    {"learnwith-ai": "/caliper/v1p2", "beyond-ai": "/caliper/event", "caliper": None}
)

#: the validation profiles (`validation.profile`), which the validator implements
Profile = Literal["timeback", "timeback-learnwith", "caliper"]
PROFILES: Final = get_args(Profile)


def _learnwith(base: str) -> Preset:
    return MappingProxyType(
        {
            ("upstream", "platform"): "learnwith-ai",
            ("upstream", "endpoint"): f"{base}/caliper/v1p2",
            ("oauth", "token_url"): f"{base}/auth/1.0/token",
            ("oauth", "scope"): _CALIPER_WRITE_SCOPE,
            ("oauth", "auth_method"): "client_secret_basic",
            ("validation", "profile"): "timeback-learnwith",
        }
    )


def _beyond(base: str, cognito: str) -> Preset:
    return MappingProxyType(
        {
            ("upstream", "platform"): "beyond-ai",
            ("upstream", "endpoint"): f"{base}/caliper/event",
            ("upstream", "jobs_url"): f"{base}/jobs/{{id}}/status",
            ("oauth", "token_url"): f"{_COGNITO.format(cognito)}/oauth2/token",
            # Cognito's client-credentials clients are granted their scopes: none is asked for.
            ("oauth", "scope"): "",
            ("oauth", "auth_method"): "client_secret_basic",
            ("validation", "profile"): "timeback",
        }
    )


#: preset name -> {(section, key): value}; applied only to keys the operator did not set.
PRESETS: Final[MappingProxyType[str, Preset]] = MappingProxyType(
    {
        "timeback": _learnwith("https://platform.timeback.com"),
        "timeback-staging": _learnwith("https://platform.dev.timeback.com"),
        "timeback-sandbox": _learnwith("https://sandbox.platform.timeback.com"),
        "timeback-beyond": _beyond("https://caliper.alpha-1edtech.ai", "prod"),
        "timeback-beyond-staging": _beyond("https://caliper.staging.alpha-1edtech.ai", "staging"),
    }
)


def platform_mismatch(platform: str, endpoint: str) -> str | None:
    """Why `upstream.platform` looks wrong for this endpoint, or None.

    The path never decides the form events leave in (a gateway or a proxy may serve any path);
    an endpoint whose path is another platform's Caliper path is only worth a warning.
    """
    path = endpoint.split("?", 1)[0].rstrip("/")
    for other, other_path in PLATFORMS.items():
        if other != platform and other_path is not None and path.endswith(other_path):
            return (
                f"upstream.platform is {platform!r} but upstream.endpoint ends in {other_path}, "
                f"the path of {other}'s Caliper API: events leave in the form {platform!r} "
                f"takes; set upstream.platform = {other!r} if that is the platform"
            )
    return None


def events_url(endpoint: str) -> str | None:
    """Where the platform lists the events it stored (Beyond AI's `GET /caliper/events`,
    beside its `/caliper/event`), or None when this endpoint has no such neighbour."""
    base, _, query = endpoint.partition("?")
    base = base.rstrip("/")
    event_path = PLATFORMS["beyond-ai"]
    if query or event_path is None or not base.endswith(event_path):
        return None
    return base + "s"
