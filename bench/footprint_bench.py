"""Footprint: how long each kind of process takes from exec to SERVING, and how much memory it holds once idle.

Each service runs alone in mesh mode (PostgreSQL + Redis, announcing itself to a control plane), as the supervisor
behind `voiceassist up --mesh` starts it; then the control plane itself and `serve all` (embedded mode). A process
that hosts one service should load that service's dependencies only.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import RUNS, cpu_seconds, median, table
from services.core import registry
from tests.support.mesh import Cluster, Server, drop_schemas, free_port

IDLE_SECONDS = 2.0  # after SERVING, before RSS is read: background work at start (probes, announcing) settles
TARGETS = {"auth": (120, 1.0), "audit": (120, 1.0)}  # RSS MB, seconds from exec to SERVING


def rss_mb(pid: int) -> float:
    """Resident set size of a process (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _footprint(start: Callable[[], Server]) -> tuple[float, float, float]:
    """Medians over RUNS starts of a process: seconds from exec to SERVING, CPU seconds it used until then (the
    wall time also counts waiting for the 2 shared cores), idle RSS in MB."""
    seconds, cpu, megabytes = [], [], []
    for _ in range(RUNS):
        started = time.perf_counter()
        server = start()
        seconds.append(time.perf_counter() - started)
        try:
            cpu.append(cpu_seconds([server.process.pid]))
            time.sleep(IDLE_SECONDS)
            megabytes.append(rss_mb(server.process.pid))
        finally:
            server.stop()
    return median(seconds), median(cpu), median(megabytes)


def _rows(name: str, seconds: float, cpu: float, megabytes: float) -> list[tuple[str, ...]]:
    rows = [(f"{name}: idle RSS", f"{megabytes:.0f} MB"), (f"{name}: exec to SERVING", f"{seconds:.2f} s")]
    if name in TARGETS:
        rss_target, start_target = TARGETS[name]
        rows = [
            (*rows[0], f"<= {rss_target} MB", "met" if megabytes <= rss_target else "not met"),
            (*rows[1], f"<= {start_target:.1f} s", "met" if seconds <= start_target else "not met"),
        ]
    return [*rows, (f"{name}: CPU used until SERVING", f"{cpu:.2f} s")]


def main() -> None:
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        mesh = Cluster.create(Path(tmp) / "mesh", mesh=True, LOG_LEVEL="WARNING")
        mesh.workdir.mkdir()
        for spec in registry.SERVICES:  # where each service calls the others, as the supervisor sets it
            mesh.env[f"{spec.name.upper()}_ADDR"] = f"127.0.0.1:{free_port()}"
        try:
            rows += _rows("control plane", *_footprint(mesh.start_control_plane))
            mesh.start_control_plane()  # stays up: every service below announces itself to it
            for spec in registry.SERVICES:
                port = int(mesh.env[f"{spec.name.upper()}_ADDR"].rsplit(":", 1)[1])
                rows += _rows(spec.name, *_footprint(lambda name=spec.name, port=port: mesh.start(name, port=port)))
        finally:
            mesh.stop()
            drop_schemas(mesh.env["DATABASE_SCHEMA_PREFIX"])
        embedded = Cluster.create(Path(tmp) / "embedded", mesh=False, LOG_LEVEL="WARNING")
        embedded.workdir.mkdir()
        try:
            rows += _rows("serve all (embedded)", *_footprint(lambda: embedded.start("all")))
        finally:
            embedded.stop()
    table(
        f"footprint (one process each: services in mesh mode on PostgreSQL + Redis, the control plane, `serve all` "
        f"embedded; median of {RUNS} starts; RSS after {IDLE_SECONDS:.0f} s idle; 2 cores)",
        rows,
    )


if __name__ == "__main__":
    main()
