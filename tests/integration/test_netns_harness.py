"""The multi-host harness (tests.support.netns), with real traffic: a server in one namespace answers the others
and the root namespace, PostgreSQL and Redis answer through the relays, link_down() partitions, netem() delays and
drops, and leaving a lab (or crashing in one) leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.support.netns import NETNS_CONFIG_DIR, Host, NetworkLab, unsupported_reason

UNSUPPORTED = unsupported_reason()
pytestmark = [
    pytest.mark.skipif(UNSUPPORTED is not None, reason=f"network lab: {UNSUPPORTED}"),
    pytest.mark.timeout(60),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_PORT = 8000  # every namespace starts empty: any port is free in it
FETCH_STATUS = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).status)"


def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    if not eventually(condition, timeout):
        pytest.fail(f"timed out after {timeout} s waiting until {what}")


def connects(host: Host, address: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection from `host` to address:port succeeds."""
    try:
        host.connect(address, port, timeout=timeout).close()
    except OSError:
        return False
    return True


def connect_seconds(host: Host, address: str, port: int) -> float:
    """The quickest of three TCP handshakes from `host`: one round trip."""
    durations = []
    for _ in range(3):
        started = time.monotonic()
        host.connect(address, port).close()
        durations.append(time.monotonic() - started)
    return min(durations)


@dataclass
class HttpServer:
    """`python -m http.server` running in a host."""

    host: Host
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host.address}:{SERVER_PORT}/"


def start_http_server(host: Host, directory: Path, probe_from: Host) -> HttpServer:
    """`python -m http.server` in `host`, once it accepts connections from `probe_from`."""
    log = directory / f"http-{host.name}.log"
    command = [sys.executable, "-m", "http.server", "--bind", host.address, "--directory", str(directory)]
    server = HttpServer(host, host.popen([*command, str(SERVER_PORT)], log_path=log), log)

    def accepting() -> bool:
        if server.process.poll() is not None:
            pytest.fail(f"the HTTP server in {host.name} exited: {log.read_text()}")
        return connects(probe_from, host.address, SERVER_PORT)

    wait_until(accepting, f"the HTTP server in {host.name} accepts connections")
    return server


@pytest.fixture(scope="module")
def lab() -> Iterator[NetworkLab]:
    with NetworkLab(["a", "b", "c"]) as lab:
        yield lab


@pytest.fixture(scope="module")
def server_in_b(lab: NetworkLab, tmp_path_factory: pytest.TempPathFactory) -> HttpServer:
    return start_http_server(lab.host("b"), tmp_path_factory.mktemp("http"), probe_from=lab.host("a"))


def test_a_server_in_one_host_answers_another_host_and_the_root_namespace(
    lab: NetworkLab, server_in_b: HttpServer
) -> None:
    c = lab.host("c")
    fetched_from_c = c.run([sys.executable, "-c", FETCH_STATUS, server_in_b.url])
    assert (fetched_from_c.returncode, fetched_from_c.stdout.strip()) == (0, "200"), fetched_from_c.stderr
    assert httpx.get(server_in_b.url, timeout=5).status_code == 200  # from the root namespace
    # The server saw each client's own address: the requests really crossed the bridge, unchanged.
    log_lines = [f"{address} - - [" for address in (c.address, lab.gateway)]
    wait_until(lambda: all(line in server_in_b.log.read_text() for line in log_lines), f"the server logged {log_lines}")


def test_postgresql_and_redis_answer_in_every_host_through_the_relays(lab: NetworkLab) -> None:
    for host in lab.hosts:
        psql = host.run(["psql", "-h", lab.gateway, "-U", "postgres", "-d", "test", "-tAc", "select 1"], timeout=10)
        assert (psql.returncode, psql.stdout.strip()) == (0, "1"), f"{host.name}: {psql.stderr}"
        redis = host.run(["redis-cli", "-h", lab.gateway, "ping"], timeout=10)
        assert (redis.returncode, redis.stdout.strip()) == (0, "PONG"), f"{host.name}: {redis.stderr}"


def test_the_postgresql_relay_serves_many_connections_at_once(lab: NetworkLab) -> None:
    # 20 sessions that each sleep 0.5 s take 10 s one after another, about 0.5 s side by side.
    async def sleep_in_sessions(count: int) -> list[int]:
        async def one_session() -> int:
            connection = await asyncpg.connect(f"postgresql://postgres@{lab.gateway}:5432/test", timeout=5)
            try:
                return await connection.fetchval("select 1 from pg_sleep(0.5)")
            finally:
                await connection.close()

        return await asyncio.gather(*(one_session() for _ in range(count)))

    started = time.monotonic()
    assert asyncio.run(sleep_in_sessions(20)) == [1] * 20
    assert time.monotonic() - started < 5


def test_link_down_partitions_a_host_until_link_up(lab: NetworkLab, server_in_b: HttpServer) -> None:
    b, c = lab.host("b"), lab.host("c")
    assert connects(c, b.address, SERVER_PORT)
    b.link_down()
    try:
        started = time.monotonic()
        assert not connects(c, b.address, SERVER_PORT, timeout=1)
        assert time.monotonic() - started < 3
        assert not connects(lab.host("a"), b.address, SERVER_PORT, timeout=1)
    finally:
        b.link_up()
    wait_until(lambda: connects(c, b.address, SERVER_PORT), "c reaches b again")
    assert server_in_b.process.poll() is None


def test_netem_delay_adds_latency_until_cleared(lab: NetworkLab, server_in_b: HttpServer) -> None:
    b, c = lab.host("b"), lab.host("c")
    before = connect_seconds(c, b.address, SERVER_PORT)
    b.netem(delay_ms=200)
    try:
        delayed = connect_seconds(c, b.address, SERVER_PORT)
        assert httpx.get(server_in_b.url, timeout=5).status_code == 200  # requests still work, slowly
    finally:
        b.clear_netem()
    after = connect_seconds(c, b.address, SERVER_PORT)
    assert before < 0.05
    assert 0.15 < delayed < 1.0  # 1 s or more would be a retransmitted SYN: a loss, not a delay
    assert after < 0.05


def test_netem_loss_drops_what_the_host_sends(lab: NetworkLab, server_in_b: HttpServer) -> None:
    b, c = lab.host("b"), lab.host("c")
    b.netem(loss_percent=100)
    try:
        assert not connects(c, b.address, SERVER_PORT, timeout=0.5)
    finally:
        b.clear_netem()
    assert connects(c, b.address, SERVER_PORT)


def test_two_labs_at_once_get_their_own_subnet_and_names(lab: NetworkLab) -> None:
    with NetworkLab(["a"]) as other:
        assert other.gateway != lab.gateway
        assert other.host("a").namespace != lab.host("a").namespace
        assert other.host("a").interface != lab.host("a").interface
        redis = other.host("a").run(["redis-cli", "-h", other.gateway, "ping"], timeout=10)
        assert redis.stdout.strip() == "PONG", redis.stderr
    assert connects(lab.host("a"), lab.gateway, 5432)  # closing the other lab left this one alone


# --- leaving nothing behind


@dataclass
class Footprint:
    """What a lab put on the machine."""

    namespaces: list[str]
    interfaces: list[str]
    gateway: str
    processes: list[subprocess.Popen[bytes]]
    pids: set[int]  # every process in the lab's namespaces, including ones that left their process group


def pids_in(host: Host) -> set[int]:
    """Every process in the host's namespace."""
    output = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True, check=True).stdout
    return {int(pid) for pid in output.split()}


def footprint_of(lab: NetworkLab, processes: list[subprocess.Popen[bytes]]) -> Footprint:
    return Footprint(
        namespaces=[host.namespace for host in lab.hosts],
        interfaces=[lab.bridge, *(host.interface for host in lab.hosts)],
        gateway=lab.gateway,
        processes=processes,
        pids=set().union(*(pids_in(host) for host in lab.hosts)),
    )


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def relay_pids(gateway: str) -> list[int]:
    """The tcp_relay processes listening on `gateway`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
            if "tests.support.tcp_relay" in args and any(arg.startswith(f"{gateway}:") for arg in args):
                pids.append(int(cmdline.parent.name))
    return [pid for pid in pids if is_running(pid)]


def assert_nothing_left(footprint: Footprint) -> None:
    namespaces = {entry["name"] for entry in json.loads(subprocess.check_output(["ip", "-json", "netns", "list"]))}
    assert not namespaces & set(footprint.namespaces)
    interfaces = {entry["ifname"] for entry in json.loads(subprocess.check_output(["ip", "-json", "link", "show"]))}
    assert not interfaces & set(footprint.interfaces)
    assert not [name for name in footprint.namespaces if (NETNS_CONFIG_DIR / name).exists()]
    assert all(process.poll() is not None for process in footprint.processes)

    def survivors() -> list[int]:
        return [pid for pid in footprint.pids if is_running(pid)] + relay_pids(footprint.gateway)

    # A SIGKILLed process needs a moment to die, one we do not own a moment more to be reaped.
    assert eventually(lambda: not survivors(), timeout=5), f"still running: {survivors()}"


# Starts a process in a session of its own: stopping the process group misses it, only killing every process in
# the namespace finds it.
LEAVES_ITS_GROUP = (
    "import subprocess, time; subprocess.Popen(['sleep', '300'], start_new_session=True); time.sleep(300)"
)


class BodyFailed(Exception):
    pass


@pytest.mark.parametrize("body_raises", [False, True], ids=["body returned", "body raised"])
def test_leaving_a_lab_removes_its_namespaces_interfaces_and_processes(tmp_path: Path, body_raises: bool) -> None:
    expected_error = pytest.raises(BodyFailed) if body_raises else contextlib.nullcontext()
    with expected_error, NetworkLab(["x", "y"]) as lab:
        x, y = lab.hosts
        server = start_http_server(x, tmp_path, probe_from=y)
        parent_of_escaped = y.popen([sys.executable, "-c", LEAVES_ITS_GROUP], log_path=tmp_path / "escaping.log")
        wait_until(lambda: len(pids_in(y)) == 2, "the escaped sleep runs in y")
        footprint = footprint_of(lab, [server.process, parent_of_escaped])
        assert len(footprint.pids) == 3 and relay_pids(lab.gateway)
        if body_raises:
            raise BodyFailed
    assert_nothing_left(footprint)


CRASHING_RUN = """
import json, sys
from tests.support.netns import NetworkLab
with NetworkLab(["x"]) as lab:
    host = lab.host("x")
    print(json.dumps({"namespace": host.namespace, "interfaces": [lab.bridge, host.interface], "gateway": lab.gateway}))
    sys.stdout.flush()
    sys.stdin.read()  # until killed
"""


def test_the_next_lab_sweeps_what_a_killed_run_left() -> None:
    command = [sys.executable, "-c", CRASHING_RUN]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as crashing:
        assert crashing.stdout is not None
        try:
            left = json.loads(crashing.stdout.readline())
        finally:
            crashing.kill()  # SIGKILL: no `with` exit, no atexit
    footprint = Footprint([left["namespace"]], left["interfaces"], left["gateway"], processes=[], pids=set())
    assert left["namespace"] in subprocess.check_output(["ip", "netns", "list"], text=True)  # nobody cleaned up
    with NetworkLab(["z"]):
        pass
    assert_nothing_left(footprint)
