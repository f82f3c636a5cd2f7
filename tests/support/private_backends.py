"""A PostgreSQL and a Redis of a test's own, on free ports, that the test may stop, kill and restart.

The machine's instances (5432, 6379) serve every other test run: a fault test never touches them. PostgreSQL's
initdb refuses to run as root, so its tools run as the `postgres` user in a folder that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.mesh import free_port


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        raise RuntimeError(f"no PostgreSQL {tool} under /usr/lib/postgresql/*/bin")
    return found[-1]


def _as_postgres(*args: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


@dataclass
class PrivatePostgres:
    """A throw-away PostgreSQL cluster with trust authentication."""

    root: Path
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        """Its data directory."""
        return self.root / "data"

    @property
    def url(self) -> str:
        """The DATABASE_URL of its `postgres` database."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls) -> PrivatePostgres:
        """initdb in a fresh folder owned by the `postgres` user, then start it."""
        root = Path(tempfile.mkdtemp(prefix="va-pg-"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        server = cls(root)
        subprocess.run(
            _as_postgres(_pg_bin("initdb"), "-D", str(server.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"),
            check=True, capture_output=True,
        )  # fmt: skip
        server.start()
        return server

    def start(self) -> None:
        """Start (again) on the same port and data; returns once it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w",
                         "start"),
            check=True, capture_output=True,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: "fast" disconnects every client (a restart), "immediate" is a crash."""
        subprocess.run(
            _as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"),
            check=False, capture_output=True,
        )  # fmt: skip

    def destroy(self) -> None:
        """Stop it and remove its files."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PrivateRedis:
    """A redis-server child process; no background saves, but `stop` saves its data for the next `start`, as a
    restart of a production Redis keeps it."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="va-redis-")))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its REDIS_URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again) on the same port; returns once it answers PING."""
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on {self.port} did not start") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """SHUTDOWN SAVE: every client disconnected, the data kept on disk for the next start."""
        assert self.process is not None
        with contextlib.suppress(redis.ConnectionError):  # it closes the connection as it goes
            redis.Redis(port=self.port).shutdown(save=True)
        self.process.wait(timeout=30)

    def destroy(self) -> None:
        """Kill it and remove its files."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
