"""caliper-sidecar: a durable local outbox that forwards IMS Caliper 1.2 events to TimeBack."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
