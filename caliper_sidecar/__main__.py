"""`python -m caliper_sidecar` is `caliper-sidecar`."""

from __future__ import annotations

from caliper_sidecar.cli import main

raise SystemExit(main())
