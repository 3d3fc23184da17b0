"""`python -m sidecar` is `caliper-sidecar`."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
