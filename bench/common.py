"""What the benchmark scripts share: starting servers as subprocesses, running wrk, reading
memory, and reporting medians."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A server in a subprocess, listening on `port`, stopped with SIGTERM."""

    def __init__(
        self,
        args: Sequence[str],
        port: int,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            list(args),
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{args} exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{args} did not listen on {port}") from None
                time.sleep(0.05)

    def peak_rss_mb(self) -> float:
        """The process's peak resident memory so far (VmHWM), in MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()  # type: ignore[union-attr]


def sidecar(tmp: Path, port: int, **sections: Any) -> Process:
    """`caliper-sidecar run` with a config built from these sections (a list of tables is an
    array of tables: `destinations=[{...}, ...]`)."""
    return sidecar_by(("-m", "caliper_sidecar"), tmp, port, **sections)


def checkout_command(tree: Path | None) -> tuple[str, ...]:
    """What Python runs (given `run -c CONFIG`) for the sidecar of another checkout, its
    caliper_sidecar first on sys.path; None: this checkout's (`-m caliper_sidecar`).
    PYTHONPATH does not do it: bench processes run in this checkout, and `python -m` puts the
    working directory before PYTHONPATH."""
    if tree is None:
        return ("-m", "caliper_sidecar")
    # run_module's argv: what follows `-c CODE` on the command line.
    code = (
        f"import runpy, sys; sys.path.insert(0, {str(tree.resolve())!r}); "
        "runpy.run_module('caliper_sidecar', run_name='__main__', alter_sys=True)"
    )
    return ("-c", code)


def sidecar_by(command: Sequence[str], tmp: Path, port: int, **sections: Any) -> Process:
    """`sidecar`, with what Python runs (given `run -c CONFIG`) instead of `-m caliper_sidecar`."""
    config = tmp / f"sidecar-{port}.toml"
    lines = []
    for section, table in {"receiver": {"port": port}, **sections}.items():
        for entry in table if isinstance(table, list) else [table]:  # [[destinations]]
            lines.append(f"[[{section}]]" if isinstance(table, list) else f"[{section}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in entry.items())
    config.write_text("\n".join(lines) + "\n")
    return Process(
        [PYTHON, *command, "run", "-c", str(config)],
        port,
        log=tmp / f"sidecar-{port}.log",
    )


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics") as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url) as response:
        return json.loads(response.read())


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("this benchmark needs wrk: apt-get install wrk")
    return wrk


def wrk(
    url: str, template: Path, *, batch: int = 1, connections: int = 64, seconds: int = 10
) -> dict[str, float]:
    """Run wrk (one thread, so the load generator takes one core at most) and return
    requests/s, p50 and p99 latency in ms, and error counts."""
    out = subprocess.run(
        [
            require_wrk(),
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(BENCH / "wrk_events.lua"),
            url,
        ],
        env={**os.environ, "TEMPLATE": str(template), "BATCH": str(batch)},
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    seconds_run = result["duration_us"] / 1e6
    return {
        "rps": result["requests"] / seconds_run,
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "errors": result["socket_errors"] + result["non_2xx"],
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}"


def fake_and_sidecar(
    tmp: Path, platform: str = "learnwith", **sections: dict[str, Any]
) -> tuple[Process, Process]:
    """The fake TimeBack (ids only) and a sidecar forwarding to it with OAuth: to its
    older events endpoint ("learnwith": events leave as stored), to its LearnWith.AI endpoint with
    `upstream.platform = "learnwith-ai"` (every event rewritten), or to its Beyond AI one with
    processing confirmation (`jobs_url`);
    `sections` add to the sidecar's configuration (an `upstream` section is merged)."""
    fake_port = free_port()
    fake = Process(
        [PYTHON, "-m", "caliper_sidecar", "mock-upstream", "--port", str(fake_port), "--ids-only"],
        fake_port,
    )
    if platform == "beyond-ai":
        target = {
            "endpoint": f"{fake.url}/caliper/event",
            "jobs_url": f"{fake.url}/jobs/{{id}}/status",
        }
    elif platform == "learnwith-ai":
        # LearnWith.AI's own endpoint: every event gets the SDK's LearnWith.AI form on the way.
        target = {"endpoint": f"{fake.url}/caliper/v1p2", "platform": "learnwith-ai"}
    else:
        target = {"endpoint": f"{fake.url}/events/1.0/"}
    upstream = {**target, **sections.pop("upstream", {})}
    server = sidecar(
        tmp,
        free_port(),
        upstream=upstream,
        oauth={
            "token_url": f"{fake.url}/auth/1.0/token",
            "client_id": "sidecar",
            "client_secret": "sidecar-secret",
        },
        **sections,
    )
    return fake, server
