#!/usr/bin/env python3
"""The two commands a fresh clone needs, on nothing but Python 3.11+:

    python3 dev.py demo    create .venv, install, run `caliper-sidecar demo`
    python3 dev.py test    create .venv, install with the test extra, run ruff, mypy, the import
                           contracts (lint-imports) and pytest, a worker per core
                           (arguments after `test` go to pytest; `-n 0`: serially)
                           (then, where ../shared is beside the clone, the tests that read it
                           once more as a fresh clone runs them: without it)

Installs are skipped when pyproject.toml has not changed since the last one.
CALIPER_SIDECAR_VENV names another venv (CI runs the demo on Python 3.12 and 3.13 so).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# Another interpreter gets a venv of its own (CI runs the demo on each Python it has).
VENV = Path(os.environ.get("CALIPER_SIDECAR_VENV") or ROOT / ".venv")
BIN = VENV / "bin"
# A worker per core, each taking whole test files (a module's fixtures, such as its
# PostgreSQL database or the built image, are made once); `-n 0` after `test` runs serially.
PARALLEL = ("-n", "auto", "--dist", "loadfile")


def ensure_installed(extra: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - the point is to say so on older ones
        sys.exit(f"caliper-sidecar needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extra.encode()).hexdigest()
    stamp = VENV / f".installed-{digest[:16]}"
    if stamp.exists():
        return
    target = f".[{extra}]" if extra else "."
    print(f"installing caliper-sidecar{f'[{extra}]' if extra else ''} into {VENV}", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "-e", target], cwd=ROOT, check=True)
    for old in VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=ROOT, check=False)
    if result.returncode:
        sys.exit(result.returncode)


def main(argv: list[str]) -> None:
    what = argv[0] if argv else ""
    if what == "demo":
        ensure_installed("")
        os.execv(BIN / "caliper-sidecar", ["caliper-sidecar", "demo"])
    elif what == "test":
        ensure_installed("test")
        run(str(BIN / "ruff"), "check", ".")
        run(str(BIN / "ruff"), "format", "--check", ".")
        run(str(BIN / "mypy"))
        run(str(BIN / "lint-imports"))
        run(str(BIN / "pytest"), *PARALLEL, *argv[1:])
        if (ROOT.parent / "shared").is_dir() and not argv[1:]:
            # ../shared may add test cases, never be needed: the modules that read it pass
            # without it too, as on a user's fresh clone.
            readers = sorted(
                str(p.relative_to(ROOT))
                for p in (ROOT / "tests").glob("test_*.py")
                if any(
                    m in p.read_text() for m in ("SHARED", ".test_properties", ".test_validation")
                )
            )
            os.environ["CALIPER_SIDECAR_TEST_SHARED"] = ""
            print("without ../shared:", flush=True)
            run(str(BIN / "pytest"), *PARALLEL, "-q", *readers)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
