"""The supervisor with real child processes: a start that fails names the child, a child that dies is restarted
with backoff while the others keep running, one that keeps crashing is left down, and stopping goes in reverse."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from services.supervisor import Child, RestartPolicy, StartupError, Supervisor

FAST = RestartPolicy(first_delay=0.05, max_delay=0.2, max_crashes=3, window=30)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _child(workdir: Path, name: str, code: str, ready: bool = True) -> Child:
    return Child(name, _python(code), workdir / f"{name}.log", lambda: ready)


SLEEPER = "import time; time.sleep(60)"


def _watch_until(supervisor: Supervisor, condition, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "supervisor did not get there in time"
        supervisor.watch_once()
        time.sleep(0.02)


def test_a_child_that_exits_while_starting_fails_the_start_with_its_name_code_and_log(workdir: Path) -> None:
    broken = _child(workdir, "auth#2", "import sys; print('auth: 127.0.0.1:7111 already in use'); sys.exit(3)", False)
    supervisor = Supervisor([[_child(workdir, "control-plane", SLEEPER)], [broken]], report=lambda _: None)
    started = time.monotonic()
    try:
        with pytest.raises(StartupError) as caught:
            supervisor.start(timeout=30)
    finally:
        supervisor.stop()
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "auth#2 failed to start (exit code 3)" in message and "127.0.0.1:7111 already in use" in message


def test_a_child_that_dies_is_reported_and_restarted_while_the_others_run(workdir: Path) -> None:
    marker = workdir / "runs"
    # Starts, dies after a moment, dies at once when restarted, then stays up.
    code = f"""
import pathlib, sys, time
runs = pathlib.Path({str(marker)!r})
n = len(runs.read_text()) if runs.exists() else 0
runs.write_text("x" * (n + 1))
if n == 0:
    time.sleep(0.3)
if n < 2:
    sys.exit(1)
time.sleep(60)
"""
    flaky, steady = _child(workdir, "audit", code), _child(workdir, "auth", SLEEPER)
    reports: list[str] = []
    supervisor = Supervisor([[steady, flaky]], reports.append, FAST)
    try:
        supervisor.start(timeout=30)
        steady_pid = steady.process.pid if steady.process else 0
        _watch_until(supervisor, lambda: marker.exists() and marker.read_text() == "xxx")
        _watch_until(supervisor, lambda: any("audit is serving again" in r for r in reports))
        time.sleep(0.3)
        supervisor.watch_once()
        assert flaky.exit_code() is None
        assert steady.process is not None and steady.process.pid == steady_pid and steady.exit_code() is None
        assert any(r.startswith("audit died (exit code 1)") for r in reports)
        assert any(r.startswith("restarting audit in") for r in reports)
        assert supervisor.down() == []
    finally:
        supervisor.stop()


def test_a_child_that_keeps_crashing_is_left_down_and_said_so(workdir: Path) -> None:
    marker = workdir / "started"
    crasher = _child(workdir, "voice", f"import pathlib, sys, time; p = pathlib.Path({str(marker)!r}); "
                     "crashing = p.exists(); p.touch(); time.sleep(0 if crashing else 0.2); sys.exit(2)")  # fmt: skip
    steady = _child(workdir, "rag", SLEEPER)
    reports: list[str] = []
    supervisor = Supervisor([[steady, crasher]], reports.append, FAST)
    try:
        supervisor.start(timeout=30)
        _watch_until(supervisor, lambda: supervisor.down() == ["voice"])
        assert any("voice crashed 3 times" in r and "leaving it down" in r for r in reports)
        assert steady.exit_code() is None  # the rest keeps serving
    finally:
        codes = supervisor.stop()
    assert codes["rag"] == -15 or codes["rag"] == 0


def test_stop_goes_in_reverse_start_order(workdir: Path) -> None:
    order = workdir / "order"
    code = ("import pathlib, signal, sys, time\n"
            "def bye(*_):\n"
            f"    with open({str(order)!r}, 'a') as f: f.write(sys.argv[1] + ' ')\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\n"
            f"pathlib.Path({str(workdir)!r}, sys.argv[1] + '.ready').touch()\n"
            "time.sleep(60)\n")  # fmt: skip

    def child(name: str) -> Child:
        ready = workdir / f"{name}.ready"
        return Child(name, [*_python(code), name], workdir / f"{name}.log", ready.exists, group=name.split("#")[0])

    stages = [[child("control-plane")], [child("auth#1"), child("auth#2"), child("audit")], [child("envoy")]]
    supervisor = Supervisor(stages, report=lambda _: None)
    supervisor.start(timeout=30)
    codes = supervisor.stop()
    assert set(codes.values()) == {0}
    stopped = order.read_text().split()
    assert stopped[0] == "envoy" and stopped[1] == "audit" and set(stopped[2:4]) == {"auth#1", "auth#2"}
    assert stopped[4] == "control-plane"
