"""Keeps a set of child processes running: `voiceassist up` (control plane, workers, Envoy) and
`voiceassist serve NAME --workers N`.

Children start in stages (every child of a stage at once; each stage ready before the next starts). A child that
exits while its stage is starting fails the start, naming it, its exit code and the end of its log. A child that
dies later is reported at once and restarted with exponential backoff while the others keep serving; one that keeps
crashing stays down and is reported. Stopping sends SIGTERM in reverse order (each child drains its calls).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services import launcher
from services.core.settings import ROOT

Report = Callable[[str], None]


class StartupError(RuntimeError):
    """A child exited, or was not ready in time, while the system was starting."""


@dataclass
class Child:
    """One supervised process."""

    name: str  # e.g. "auth#2", "envoy", "control-plane"
    args: Sequence[str]
    log_path: Path
    ready: Callable[[], bool]  # one quick check: does it serve yet?
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT
    group: str = ""  # children of one group (a service's workers) stop together; default: its own name
    process: subprocess.Popen[bytes] | None = None
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # when a crashed child is started again
    serving: bool = False
    given_up: bool = False

    def __post_init__(self) -> None:
        self.group = self.group or self.name

    def start(self) -> None:
        """Start (or restart) the process."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = launcher.spawn(self.args, env=self.env, log_path=self.log_path, cwd=self.cwd)
        self.serving = False
        self.restart_at = None

    def exit_code(self) -> int | None:
        """None while running (or never started)."""
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = 12) -> str:
        """The last lines it logged, indented for a report."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "    (no log)"
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return "\n".join(f"    {line[:400]}" for line in tail) or "    (empty log)"


def describe_exit(code: int) -> str:
    """'exit code 1' or 'killed by SIGKILL'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class RestartPolicy:
    """When a crashed child is started again, and when it is left down."""

    first_delay: float = 0.5  # seconds before the first restart; doubles with each crash in the window
    max_delay: float = 15.0
    max_crashes: int = 5  # this many crashes within `window` seconds: leave it down
    window: float = 120.0

    def delay(self, crashes: int) -> float:
        """Backoff before restart number `crashes` (1-based)."""
        return min(self.max_delay, self.first_delay * 2.0 ** (crashes - 1))


class Supervisor:
    """Starts children stage by stage, restarts the ones that die, stops them in reverse order."""

    def __init__(self, stages: Sequence[Sequence[Child]], report: Report, policy: RestartPolicy | None = None) -> None:
        self.stages = [list(stage) for stage in stages]
        self.report = report
        self.policy = policy or RestartPolicy()

    @property
    def children(self) -> list[Child]:
        """Every child, in start order."""
        return [child for stage in self.stages for child in stage]

    def start(self, timeout: float = 180.0) -> None:
        """Start every stage and wait until each child is ready; StartupError names the first that failed."""
        for stage in self.stages:
            for child in stage:
                child.start()
            deadline = time.monotonic() + timeout
            waiting = list(stage)
            while waiting:
                for child in list(waiting):
                    code = child.exit_code()
                    if code is not None:
                        raise StartupError(
                            f"{child.name} failed to start ({describe_exit(code)}); the end of {child.log_path}:\n"
                            f"{child.log_tail()}"
                        )
                    if child.ready():
                        child.serving = True
                        waiting.remove(child)
                if waiting and time.monotonic() > deadline:
                    names = ", ".join(c.name for c in waiting)
                    raise StartupError(f"not ready after {timeout:.0f}s: {names}; logs in {waiting[0].log_path.parent}")
                if waiting:
                    time.sleep(0.1)

    def watch_once(self) -> None:
        """One round of supervision: report deaths, schedule and perform restarts, notice recoveries."""
        now = time.monotonic()
        for child in self.children:
            if child.given_up:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.start()
                continue
            code = child.exit_code()
            if code is None:
                if not child.serving and child.ready():
                    child.serving = True
                    self.report(f"{child.name} is serving again")
                continue
            self._crashed(child, code, now)

    def _crashed(self, child: Child, code: int, now: float) -> None:
        child.crashes.append(now)
        while child.crashes and now - child.crashes[0] > self.policy.window:
            child.crashes.popleft()
        crashes = len(child.crashes)
        self.report(f"{child.name} died ({describe_exit(code)}); the end of {child.log_path}:\n{child.log_tail(6)}")
        if crashes >= self.policy.max_crashes:
            child.given_up = True
            self.report(
                f"{child.name} crashed {crashes} times in {self.policy.window:.0f}s: leaving it down "
                "(the rest keeps serving; fix it and restart `voiceassist up`)"
            )
            return
        delay = self.policy.delay(crashes)
        child.restart_at = now + delay
        self.report(f"restarting {child.name} in {delay:.1f}s (crash {crashes} of {self.policy.max_crashes} allowed "
                    f"in {self.policy.window:.0f}s)")  # fmt: skip

    def down(self) -> list[str]:
        """Names of the children left down after repeated crashes."""
        return [c.name for c in self.children if c.given_up]

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM in reverse start order, a group at a time (a service's workers together, so a service that
        records audit events stops before the audit service); each child's exit code by name."""
        codes: dict[str, int] = {}
        for stage in reversed(self.stages):
            groups: dict[str, list[Child]] = {}
            for child in stage:
                if child.process is not None:
                    groups.setdefault(child.group, []).append(child)
            for members in reversed(groups.values()):
                processes = [c.process for c in members if c.process is not None]
                for child, code in zip(members, launcher.stop_all(processes, timeout), strict=True):
                    codes[child.name] = code
        return codes
