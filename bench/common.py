"""Shared by the benchmarks: start the system, run load tools, print tables."""

from __future__ import annotations

import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.mesh import Cluster, all_upstreams

RUNS = 3  # every throughput figure is the median of this many runs


@contextmanager
def embedded_system() -> Iterator[Cluster]:
    """`serve all` + Envoy in a scratch folder (the per-IP limits raised: every call comes from 127.0.0.1)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        cluster = Cluster.create(Path(tmp), mesh=False)
        try:
            server = cluster.start("all")
            cluster.start_envoy(all_upstreams(server))
            yield cluster
        finally:
            cluster.stop()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    """The median."""
    return statistics.median(values)


def h2load_rps(url: str, body: Path, headers: dict[str, str], requests: int = 20000, clients: int = 10) -> float:
    """Requests/s of gRPC calls (HTTP/2 POSTs of a framed message) by h2load: 10 connections x 5 streams."""
    args = ["h2load", "-n", str(requests), "-c", str(clients), "-m", "5", "-d", str(body)]
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=300).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not done or not rps or done.group(1) != done.group(2):
        raise RuntimeError(f"h2load failed:\n{out[-2000:]}")
    return float(rps.group(1))


@dataclass(frozen=True)
class WrkRun:
    """One wrk run: throughput and latency percentiles."""

    rps: float
    p50_ms: float
    p99_ms: float


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


Post = tuple[str, str]  # (path, JSON body) of one POST


def _post_script(posts: list[Post], folder: Path) -> Path:
    """A wrk script that sends the POSTs in turn."""
    script = folder / "post.lua"
    quoted = ", ".join(f"{{[==[{path}]==], [==[{body}]==]}}" for path, body in posts)
    script.write_text(
        f"local posts = {{{quoted}}}\nlocal i = 0\n"
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        "request = function()\n  i = i % #posts + 1\n  return wrk.format(nil, posts[i][1], nil, posts[i][2])\nend\n"
    )
    return script


def wrk(
    url: str, headers: dict[str, str], seconds: int = 5, connections: int = 50, posts: list[Post] | None = None
) -> WrkRun:
    """HTTP load by wrk (2 threads): GETs of `url`, or `posts` in turn to its host; requests/s and latency
    percentiles."""
    args = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    with tempfile.TemporaryDirectory() as tmp:
        if posts:
            args += ["-s", str(_post_script(posts, Path(tmp)))]
        out = subprocess.run([*args, url], capture_output=True, text=True, timeout=120).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    p50, p99 = (re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M) for q in (50, 99))
    return WrkRun(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), _ms(*p50.groups()), _ms(*p99.groups()))


def wrk_rps(url: str, headers: dict[str, str], seconds: int = 5, connections: int = 50) -> float:
    """Requests/s of JSON GETs by wrk (2 threads)."""
    return wrk(url, headers, seconds, connections).rps


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def pids_named(name: str) -> list[int]:
    """Processes whose name is exactly `name` (e.g. every PostgreSQL backend)."""
    found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def measured(
    url: str, headers: dict[str, str], groups: dict[str, list[int]], seconds: int, posts: list[Post] | None = None
) -> tuple[WrkRun, dict[str, float]]:
    """One wrk run, and each group's CPU milliseconds per request (wrk's own too)."""
    before = {name: cpu_seconds(pids) for name, pids in groups.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = wrk(url, headers, seconds=seconds, posts=posts)
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    requests = run.rps * seconds
    cpu = {name: (cpu_seconds(pids) - before[name]) * 1000 / requests for name, pids in groups.items()}
    used = after_children.ru_utime + after_children.ru_stime - children.ru_utime - children.ru_stime
    return run, cpu | {"wrk": used * 1000 / requests}


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def require_tools(*names: str) -> None:
    """Fail early with a clear message when a load tool is missing."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise SystemExit(f"missing load tools: {', '.join(missing)} (run scripts/system-deps)")


# Every table printed in this run, for bench/results.md: (title, rows).
TABLES: list[tuple[str, list[tuple[str, ...]]]] = []


def table(title: str, rows: list[tuple[str, ...]]) -> None:
    """Print a table of (figure, value) or (figure, value, target, met) rows, and keep it for bench/results.md."""
    TABLES.append((title, rows))
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n" + "-" * (width + 20))
    for name, value, *target in rows:
        print(f"{name:<{width}}  {value}" + (f"   (target {target[0]}: {target[1]})" if target else ""))


def results_markdown(started: str) -> str:
    """Every figure of this run in one Markdown table (benchmark, figure, value, target, met or not), then how each
    benchmark was run."""
    lines = [
        f"# Benchmark results ({started})",
        "",
        "Written by `make bench` from one run; how each benchmark ran is below the table.",
        "",
        "| benchmark | figure | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for number, (title, rows) in enumerate(TABLES, 1):
        name = f"{number}. {title.split(':')[0].split(' (')[0]}"  # "3. scale-out", from the table's title
        lines += [
            f"| {name} | {r[0]} | {r[1]} | {r[2] if len(r) > 2 else ''} | {r[3] if len(r) > 3 else ''} |"
            for r in rows
        ]
    lines += ["", "## How each benchmark ran", ""]
    lines += [f"{number}. {title}" for number, (title, _rows) in enumerate(TABLES, 1)]
    return "\n".join(lines)
