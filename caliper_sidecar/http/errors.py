"""Storage failures as apps are told of them: the reason, and a request id under which the log
holds what actually failed (a database's column names, its address: not for apps)."""

from __future__ import annotations

import uuid
from typing import Any

import structlog

from caliper_sidecar.exceptions import OutboxUnavailable

log = structlog.get_logger("sidecar.errors")


def unavailable_body(error: OutboxUnavailable, path: str) -> dict[str, Any]:
    """The JSON body of a 503 for this failure; a failure with a detail is logged with the
    request id the body carries."""
    body: dict[str, Any] = {"error": error.reason, "message": str(error)}
    if error.detail is not None:
        request_id = uuid.uuid4().hex[:16]
        log.error("storage_error", request_id=request_id, path=path, detail=error.detail)
        body["request_id"] = request_id
    return body
