"""The HTTP API as an OpenAPI 3.1 document: what `GET /openapi.json` serves, and what
`docs/openapi.json` holds (the same bytes, written by `python -m caliper_sidecar.tools.reference`;
a test compares them)."""

from __future__ import annotations

import json
from typing import Any, Final

import msgspec

from caliper_sidecar import __version__
from caliper_sidecar.http import bodies
from caliper_sidecar.http.cors import CROSS_ORIGIN_PATHS

JSON: Final = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _answer(description: str, schema: dict[str, Any] | None = None, **headers: str) -> Any:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {JSON: {"schema": schema}}
    if headers:
        out["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return out


_ERROR = _ref("Error")
_ERRORS: Final = {
    "400": _answer("malformed JSON, or not an event, an array of events or an envelope", _ERROR),
    "401": _answer("a missing or wrong bearer token", _ERROR),
    "408": _answer("the body did not arrive in time", _ERROR),
    "413": _answer("the body, the event count or one event is too large", _ERROR),
    "415": _answer("another content type or content encoding", _ERROR),
    "422": _answer("an event breaks a rule; nothing of the request was stored", _ref("Invalid")),
    "503": _answer(
        "the outbox is full, the disk is full, or the sidecar is shutting down",
        _ERROR,
        **{"Retry-After": "seconds to wait before retrying"},
    ),
}
_BODY: Final = {
    "required": True,
    "description": "one Caliper event, a JSON array of events, or a Caliper envelope; or JSON "
    "Lines, one event a line (Content-Encoding gzip or deflate accepted)",
    "content": {
        JSON: {"schema": _ref("Events")},
        "application/ld+json": {"schema": _ref("Events")},
        "application/x-ndjson": {"schema": {"type": "string", "description": "one event a line"}},
        "application/jsonl": {"schema": {"type": "string", "description": "one event a line"}},
    },
}
Security = list[dict[str, list[str]]]
#: open without receiver.tokens, else a sender token
_SENDER: Final[Security] = [{}, {"sender": []}]
#: this machine, or the admin token
_OPERATOR: Final[Security] = [{}, {"admin": []}]


def _ingest(summary: str, ok: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": _SENDER,
        "requestBody": _BODY,
        "responses": {ok: _answer("every event is committed to the outbox", schema), **_ERRORS},
    }


#: a replay's or a purge's `destination`: only that destination's dead letters
_DESTINATION: Final = {
    "type": "string",
    "minLength": 1,
    "description": "only the dead letters of this destination: upstream, or a [[destinations]] "
    "name (a replay takes only a destination of the running configuration)",
}


def _selection_body() -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["ids"],
                            "properties": {
                                "ids": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {"type": "string"},
                                },
                                "destination": _DESTINATION,
                            },
                        },
                        {
                            "type": "object",
                            "required": ["all"],
                            "properties": {"all": {"const": True}, "destination": _DESTINATION},
                        },
                    ]
                }
            }
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route of the sidecar."""
    caliper = _ingest(
        "Ingest, answered as TimeBack's Caliper API answers",
        "200",
        _ref("CaliperAccepted"),
    )
    not_found = _answer("unknown", _ERROR)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "caliper-sidecar",
            "version": __version__,
            "description": "A durable local outbox that forwards IMS Caliper 1.2 events to "
            "TimeBack. Ingest and TimeBack's API on the receiver's listener; the operators' "
            "routes on the ops listener (the same one unless ops.port is set).",
        },
        "paths": {
            "/v1/events": {"post": _ingest("Ingest events", "202", _ref("Accepted"))},
            "/caliper/event": {"post": caliper},
            "/caliper/v1p2": {"post": caliper},
            "/caliper/event/validate": {
                "post": {
                    "summary": "Validate only; nothing is stored",
                    "security": _SENDER,
                    "requestBody": _BODY,
                    "responses": {
                        "200": _answer("the verdict", _ref("Validation")),
                        **{k: v for k, v in _ERRORS.items() if k not in ("422", "503")},
                    },
                }
            },
            "/auth/1.0/token": _token(),
            "/oauth2/token": _token(),
            "/jobs/{job}/status": {
                "get": {
                    "summary": "A job this sidecar answered an app with, as TimeBack's JobStatus",
                    "security": _SENDER,
                    "parameters": [_path("job")],
                    "responses": {
                        "200": _answer("the job", _ref("JobStatus")),
                        "401": _ERRORS["401"],
                        "404": not_found,
                        "503": _ERRORS["503"],
                    },
                }
            },
            "/v1/events/{id}": {
                "get": {
                    "summary": "One event's journey",
                    "security": _SENDER,
                    "parameters": [_path("id")],
                    "responses": {
                        "200": _answer("where the event is", _ref("Journey")),
                        "401": _ERRORS["401"],
                        "404": not_found,
                        "503": _ERRORS["503"],
                    },
                }
            },
            "/caliper/events": {
                "get": {
                    "summary": "The platform's stored events (Beyond AI), read through with the "
                    "sidecar's own token; the query is passed on as it is",
                    "security": _SENDER,
                    "parameters": [
                        {"name": name, "in": "query", "schema": {"type": "string"}}
                        for name in (
                            "limit",
                            "offset",
                            "sensor",
                            "startDate",
                            "endDate",
                            "actorId",
                            "actorEmail",
                        )
                    ],
                    "responses": _read_through("a page of the platform's events"),
                }
            },
            "/caliper/events/{id}": {
                "get": {
                    "summary": "One of the platform's stored events, by its external id",
                    "security": _SENDER,
                    "parameters": [_path("id")],
                    "responses": {
                        "400": _answer(
                            "the id is `.` or `..`, or holds `/` or `\\` (invalid_event_id)",
                            _ERROR,
                        ),
                        **_read_through("the platform's event"),
                    },
                }
            },
            "/": {
                "get": {
                    "summary": "The status page, for people",
                    "responses": {
                        "200": {
                            "description": "HTML",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Alive",
                    "responses": {"200": _answer("alive", _ref("Health"))},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Ready to take events",
                    "responses": {
                        "200": _answer("ready", _ref("Health")),
                        "503": _answer("not ready, and why", _ref("Health")),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (OpenMetrics when asked)",
                    "security": _OPERATOR,
                    "responses": {
                        "200": {
                            "description": "the exposition",
                            "content": {
                                "text/plain": {"schema": {"type": "string"}},
                                "application/openmetrics-text": {"schema": {"type": "string"}},
                            },
                        },
                        "401": _ERRORS["401"],
                        "503": _ERRORS["503"],
                    },
                }
            },
            "/v1/status": {
                "get": {
                    "summary": "The outbox, the upstream and every destination, as JSON",
                    "security": _OPERATOR,
                    "responses": {
                        "200": _answer("the state", _ref("Status")),
                        "401": _ERRORS["401"],
                        "503": _ERRORS["503"],
                    },
                }
            },
            "/v1/dead-letters": {
                "get": {
                    "summary": "Dead letters, oldest first",
                    "security": _OPERATOR,
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {"name": "after", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "destination",
                            "in": "query",
                            "description": "only this destination's: upstream, or a "
                            "[[destinations]] name",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": _answer("a page of dead letters", _ref("DeadLetters")),
                        "400": _answer("limit is not an integer", _ERROR),
                        "401": _ERRORS["401"],
                        "403": _answer("from another machine without an admin token", _ERROR),
                        "503": _ERRORS["503"],
                    },
                }
            },
            "/v1/dead-letters/replay": _admin("Put dead letters back in the queue", "Replayed"),
            "/v1/dead-letters/purge": _admin("Delete dead letters for good", "Purged"),
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _answer("OpenAPI 3.1", {"type": "object"})},
                }
            },
        },
        "components": {"securitySchemes": _SECURITY, "schemas": _schemas()},
    }
    for path in CROSS_ORIGIN_PATHS:
        document["paths"][path]["options"] = {
            "summary": "CORS preflight, for the web origins in receiver.cors_origins",
            "parameters": [_path(p) for p in ("job", "id") if "{" + p + "}" in path],
            "responses": {
                "204": {"description": "the origin is listed: the CORS headers"},
                "403": _answer("the origin is not listed", _ERROR),
            },
        }
    return document


def _token() -> dict[str, Any]:
    parameters = {
        "type": "object",
        "required": ["grant_type"],
        "properties": {
            "grant_type": {"const": "client_credentials"},
            "client_id": {"type": "string"},
            "client_secret": {"type": "string"},
            "scope": {"type": "string"},
        },
    }
    return {
        "post": {
            "summary": "OAuth2 client credentials, for apps using TimeBack's SDK (Basic auth "
            "or parameters; form-encoded or JSON)",
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {"schema": parameters},
                    JSON: {"schema": parameters},
                },
            },
            "responses": {
                "200": _answer("a token", _ref("Token")),
                "400": _answer("a parameter is missing or wrong; it is named", _ref("OAuthError")),
                "401": _answer("the client secret is no sender token", _ref("OAuthError")),
                "408": _answer("the body did not arrive in time", _ERROR),
                "413": _answer("the body is too large", _ERROR),
            },
        }
    }


def _read_through(what: str) -> dict[str, Any]:
    """The answers of a route read through to the platform: the platform's own, or ours."""
    return {
        "200": _answer(what + ", as the platform answered", {"type": "object"}),
        "401": _ERRORS["401"],
        "404": _answer(
            "the platform does not know it, or lists no events (not_available)",
            {"type": "object"},
        ),
        "503": _answer(
            "the platform cannot be reached, or refuses the sidecar's own credentials",
            _ERROR,
            **{"Retry-After": "seconds to wait before retrying"},
        ),
        "default": _answer("the platform's own answer", {"type": "object"}),
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _admin(summary: str, counted: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": _OPERATOR,
            "requestBody": _selection_body(),
            "responses": {
                "200": _answer("done", _ref(counted)),
                "400": _answer(
                    "not {ids} or {all: true}, or (replay) a destination this configuration "
                    "does not have",
                    _ERROR,
                ),
                "401": _ERRORS["401"],
                "403": _answer(
                    "from another machine without an admin token, or from a web origin that "
                    "is not listed in receiver.cors_origins",
                    _ERROR,
                ),
                "408": _ERRORS["408"],
                "415": _answer("not Content-Type: application/json", _ERROR),
                "503": _ERRORS["503"],
            },
        }
    }


_SECURITY: Final = {
    "sender": {
        "type": "http",
        "scheme": "bearer",
        "description": "one of receiver.tokens, or a token from /auth/1.0/token",
    },
    "admin": {"type": "http", "scheme": "bearer", "description": "admin.token"},
}


def _schemas() -> dict[str, Any]:
    """The request body's schema, and every answer body's, generated from http/bodies.py."""
    _, answers = msgspec.json.schema_components(
        bodies.DOCUMENTED, ref_template="#/components/schemas/{name}"
    )
    events = {
        "description": "an event (an object with an action), an array of them, or an envelope",
        "oneOf": [{"type": "object"}, {"type": "array", "items": {}}],
    }
    return {"Events": events, **answers}


def rendered() -> bytes:
    """The document as served and as committed: stable bytes."""
    return (json.dumps(document(), indent=2, ensure_ascii=False) + "\n").encode()
