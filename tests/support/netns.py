"""Several hosts on one machine, for tests: one Linux network namespace per host, all on one bridge.

    with NetworkLab(["a", "b", "c"]) as lab:
        b = lab.host("b")
        b.popen([sys.executable, "-m", "http.server", "--bind", b.address, "8000"], log_path=tmp_path / "b.log")
        lab.host("c").connect(b.address, 8000)  # a TCP connection from c to b
        b.link_down()  # partition b
        b.netem(delay_ms=200)  # make b slow

Layout of a lab, for a run id <run> (6 random hex digits) and a free subnet 10.<n>.0.0/24 (the first n in 200..254
that no address or route of this machine overlaps):
- the bridge `vanl<run>br` in the root namespace, address 10.<n>.0.1 (`lab.gateway`);
- per host, in the order given: the namespace `vanl-<run>-<name>` with `lo` and `eth0` up, `eth0` at
  10.<n>.0.2, .3, ... and a default route via the gateway; `eth0` is one end of a veth pair whose other end,
  `vanl<run>h<last octet>` (`host.interface`), is a port of the bridge;
- PostgreSQL and Redis listen on 127.0.0.1 of the root namespace only, so a tests.support.tcp_relay process listens
  on the gateway's ports 5432 and 6379 and forwards there: hosts use `lab.gateway` as the database and Redis host;
- processes started in a host (`ip netns exec` bind-mounts /etc/netns/<namespace>/*) see an /etc/hosts that names
  every host of the lab, and a resolv.conf without a reachable DNS server, so that lookups fail at once: with the
  machine's own, every lookup (`python -m http.server` makes one at startup) would hang until the resolver's timeout.

Everything a lab creates is named with the `vanl` prefix and its run id, and the run holds an flock on
/run/voiceassist-netlab/<run>.lock while it lives. Each new lab first removes the namespaces (and the processes in
them), /etc/netns files, interfaces and firewall rules of runs whose lock nobody holds (a crashed run: the kernel
released its lock), so leftovers never pile up and two concurrent runs never touch each other's.

Needs root and iproute2; entering a lab skips the test (pytest.skip) otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO

import pytest

from services.launcher import dying_with_parent
from tests.support.nfqueue_netem import QUEUE_NUMBER

PREFIX = "vanl"
"""Starts the name of every namespace, interface and firewall rule comment that a lab creates."""
STATE_DIR = Path("/run/voiceassist-netlab")
"""Holds one lock file per live lab (tmpfs: emptied on reboot, like the namespaces)."""
NETNS_CONFIG_DIR = Path("/etc/netns")
"""Where `ip netns exec` finds per-namespace files (hosts, resolv.conf) to bind-mount over /etc."""
DEFAULT_RELAYS: Mapping[int, tuple[str, int]] = {5432: ("127.0.0.1", 5432), 6379: ("127.0.0.1", 6379)}
"""Gateway port -> where in the root namespace it forwards to: PostgreSQL and Redis."""

_REPO_ROOT = Path(__file__).resolve().parents[2]
_RUN_ID = re.compile(r"[0-9a-f]{6}")
_LINK_NAME = re.compile(rf"{PREFIX}([0-9a-f]{{6}})(?:br|h\d+)")
_NAMESPACE_NAME = re.compile(rf"{PREFIX}-([0-9a-f]{{6}})-.+")
_RULE_COMMENT = re.compile(rf"--comment {PREFIX}-([0-9a-f]{{6}})\b")
_HOST_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_SUBNET_SECOND_OCTETS = range(200, 255)
_MAX_HOSTS = 253  # .2 to .254 of a /24
_STOP_TIMEOUT_SECONDS = 5.0
_READY_TIMEOUT_SECONDS = 10.0
_PROBE_TIMEOUT_SECONDS = 2.0
_RESOLV_CONF = """\
# Written by tests.support.netns: no DNS server is reachable from a lab host, so lookups fail at once (nothing
# listens on port 53 in the namespace) instead of timing out. The lab's hosts are in /etc/hosts.
nameserver 127.0.0.1
"""
_NETEM_RULE = ("OUTPUT", "-o", "eth0", "-j", "NFQUEUE", "--queue-num", str(QUEUE_NUMBER))

_CLONE_NEWNET = 0x40000000
# libc's setns(2), for sockets this process opens inside a host's namespace.
_libc = ctypes.CDLL(None, use_errno=True)


def unsupported_reason() -> str | None:
    """Why this machine cannot run a lab (not Linux, not root, no `ip netns`), or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces, a bridge and veth pairs needs root"
    if shutil.which("ip") is None:
        return "iproute2 (the `ip` command) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


class Host:
    """One host of a lab: a network namespace whose only interface, eth0, sits on the lab's bridge."""

    def __init__(
        self, name: str, namespace: str, address: str, interface: str, processes: list[subprocess.Popen[bytes]]
    ) -> None:
        self.name = name
        self.namespace = namespace
        """Its network namespace, for `ip netns exec` / `ip -n`."""
        self.address = address
        """Its IPv4 address, on eth0."""
        self.interface = interface
        """The root-namespace end of its veth pair: the bridge port that link_down() turns off."""
        self._processes = processes  # the lab's list: the lab stops them all when it closes
        self._netem_queue: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"Host({self.name!r}, namespace={self.namespace!r}, address={self.address!r})"

    def popen(
        self, args: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `args` inside this host, in the repository root, with os.environ plus `env`, stdout and stderr
        appended to `log_path`. The lab stops it when it closes (SIGTERM to its process group, SIGKILL 5 s later)."""
        with open(log_path, "ab") as log:
            process = _spawn(self._inside(args), stdout=log, stderr=log, env={**os.environ, **(env or {})})
        self._processes.append(process)
        return process

    def run(self, args: Sequence[str], *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run `args` inside this host to completion, output captured as text; a non-zero exit does not raise."""
        return subprocess.run(
            self._inside(args), cwd=_REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )

    def connect(self, address: str, port: int, *, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from this host to address:port, made by the calling process (no child needed)."""
        connection = _socket_in_namespace(self.namespace)
        try:
            connection.settimeout(timeout)
            connection.connect((address, port))
        except BaseException:
            connection.close()
            raise
        return connection

    def link_down(self) -> None:
        """Partition this host: its bridge port goes down, so every packet to or from it is lost. Connections are
        not reset, they just stop getting answers, as on a real network."""
        _run(["ip", "link", "set", self.interface, "down"])

    def link_up(self) -> None:
        """End the partition of link_down()."""
        _run(["ip", "link", "set", self.interface, "up"])

    def netem(self, *, delay_ms: float = 0.0, loss_percent: float = 0.0) -> None:
        """Hold every packet this host sends for `delay_ms` and drop `loss_percent` % of them, as
        `tc qdisc replace dev eth0 root netem delay <delay_ms>ms loss <loss_percent>%` in the host would: a round trip
        with this host takes `delay_ms` longer. Replaces the previous setting.

        Not done with tc itself: the test machine's kernel has no sch_netem (CONFIG_NET_SCH_NETEM unset, no loadable
        modules). Instead an iptables NFQUEUE rule in the host's namespace hands the packets to a
        tests.support.nfqueue_netem process, which holds and drops them."""
        if delay_ms < 0 or not 0 <= loss_percent <= 100:
            raise ValueError(f"netem: delay_ms={delay_ms}, loss_percent={loss_percent}")
        self.clear_netem()
        command = [sys.executable, "-m", "tests.support.nfqueue_netem"]
        command += ["--delay-ms", str(delay_ms), "--loss-percent", str(loss_percent)]
        queue = _spawn(self._inside(command), stdout=subprocess.PIPE)
        self._processes.append(queue)
        try:
            _wait_ready(queue, f"the netem queue of {self.name}")
            # Only now: until the queue is bound, the rule would drop every packet.
            _run(self._inside(["iptables", "-w", "-A", *_NETEM_RULE]))
        except BaseException:
            _stop([queue])
            raise
        self._netem_queue = queue

    def clear_netem(self) -> None:
        """Remove the delay and loss of netem()."""
        if self._netem_queue is None:
            return
        # The rule goes first, so no packet is queued after the queue process has released its last ones.
        _run(self._inside(["iptables", "-w", "-D", *_NETEM_RULE]))
        _stop([self._netem_queue])
        self._netem_queue = None

    def _inside(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]


class NetworkLab:
    """Hosts (network namespaces) on one bridge, with relays to the root namespace's PostgreSQL and Redis.

    A context manager: entering creates everything, leaving (also after an exception) stops every process the
    lab started and removes its namespaces, interfaces and firewall rules. `relays` maps a gateway port to the
    root-namespace (host, port) it forwards to."""

    def __init__(self, host_names: Sequence[str], *, relays: Mapping[int, tuple[str, int]] = DEFAULT_RELAYS) -> None:
        bad_names = [name for name in host_names if not _HOST_NAME.fullmatch(name)]
        if bad_names:
            raise ValueError(f"host names must match {_HOST_NAME.pattern}: {bad_names}")
        if len(set(host_names)) != len(host_names) or not 0 < len(host_names) <= _MAX_HOSTS:
            raise ValueError(f"expected 1 to {_MAX_HOSTS} distinct host names, got {list(host_names)}")
        self._host_names = list(host_names)
        self._relays = dict(relays)
        self._run_id: str | None = None
        self._run_lock: int | None = None  # file descriptor holding the flock on STATE_DIR/<run id>.lock
        self._subnet: ipaddress.IPv4Network | None = None
        self._hosts: dict[str, Host] = {}
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def gateway(self) -> str:
        """The bridge's address: where hosts reach the root namespace, and its PostgreSQL and Redis relays."""
        return str(self._entered_subnet()[1])

    @property
    def bridge(self) -> str:
        """The bridge's interface name."""
        self._entered_subnet()
        return f"{PREFIX}{self._run_id}br"

    @property
    def hosts(self) -> tuple[Host, ...]:
        """Every host, in the order given."""
        return tuple(self._hosts.values())

    def host(self, name: str) -> Host:
        """The host called `name`."""
        return self._hosts[name]

    def __enter__(self) -> NetworkLab:
        reason = unsupported_reason()
        if reason:
            pytest.skip(f"network lab: {reason}")
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        _open_labs.add(self)
        try:
            # One lab sets up at a time on this machine: the sweep must not race a lab being built, and the
            # subnet a lab picks is only visible to the next one once its bridge has the address.
            with _exclusive_lock(STATE_DIR / "setup.lock"):
                _sweep_stale_runs()
                self._run_id, self._run_lock = _claim_run_id()
                self._subnet = _free_subnet()
                self._create_network()
            self._allow_bridged_forwarding()
            self._start_relays()
            self._check_connectivity()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process the lab started, remove its namespaces, interfaces and firewall rules. Raises if
        something could not be removed. Closing twice does nothing."""
        _open_labs.discard(self)
        if self._run_id is None:
            return
        try:
            _stop(self._processes)
            leftovers = _remove_run(self._run_id)
        finally:
            # Released even when removal failed: the run is then stale, and the next lab's sweep retries.
            (STATE_DIR / f"{self._run_id}.lock").unlink(missing_ok=True)
            if self._run_lock is not None:
                os.close(self._run_lock)
            self._run_id = self._run_lock = None
        if leftovers:
            raise RuntimeError(f"network lab: could not remove {leftovers}")

    def _entered_subnet(self) -> ipaddress.IPv4Network:
        if self._subnet is None or self._run_id is None:
            raise RuntimeError("the network lab is not entered")
        return self._subnet

    def _create_network(self) -> None:
        subnet, bridge = self._entered_subnet(), self.bridge
        root_commands = [
            f"link add name {bridge} type bridge",
            f"address add {subnet[1]}/{subnet.prefixlen} dev {bridge}",
            f"link set {bridge} up",
        ]
        for index, name in enumerate(self._host_names):
            address = subnet[index + 2]
            host = Host(
                name,
                namespace=f"{PREFIX}-{self._run_id}-{name}",
                address=str(address),
                interface=f"{PREFIX}{self._run_id}h{int(address) & 0xFF}",
                processes=self._processes,
            )
            root_commands += [
                f"netns add {host.namespace}",
                f"link add name {host.interface} type veth peer name eth0 netns {host.namespace}",
                f"link set {host.interface} master {bridge} up",
            ]
            self._hosts[name] = host
        _run(["ip", "-batch", "-"], stdin="\n".join(root_commands))
        hosts_file = Path("/etc/hosts").read_text() + f"\n# network lab {self._run_id}\n"
        hosts_file += "".join(f"{host.address} {host.name}\n" for host in self._hosts.values())
        for host in self._hosts.values():
            config_dir = NETNS_CONFIG_DIR / host.namespace
            config_dir.mkdir(parents=True)
            (config_dir / "hosts").write_text(hosts_file)
            (config_dir / "resolv.conf").write_text(_RESOLV_CONF)
        for host in self._hosts.values():
            host_commands = [
                "link set lo up",
                f"address add {host.address}/{subnet.prefixlen} dev eth0",
                "link set eth0 up",
                f"route add default via {subnet[1]}",
            ]
            _run(["ip", "-netns", host.namespace, "-batch", "-"], stdin="\n".join(host_commands))

    def _allow_bridged_forwarding(self) -> None:
        # With br_netfilter's bridge-nf-call-iptables=1 (set on this machine), frames between two ports of a bridge
        # go through iptables' FORWARD chain, where a DROP policy (Docker sets one) or rule silently cuts hosts off
        # each other. Rather than change that global sysctl, accept this bridge's own traffic first in the chain,
        # tagged with the run id so that closing (or a later lab's sweep) removes exactly this rule.
        # rp_filter needs nothing: every path here is symmetric (hosts and gateway share one subnet and bridge).
        if Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() != "1":
            return
        for iptables in _iptables_commands():
            if _forward_chain(iptables) == ["-P FORWARD ACCEPT"]:
                continue  # nothing there can drop a frame
            comment = ["-m", "comment", "--comment", f"{PREFIX}-{self._run_id}"]
            _run([*iptables, "-I", "FORWARD", "-i", self.bridge, "-o", self.bridge, *comment, "-j", "ACCEPT"])

    def _start_relays(self) -> None:
        if not self._relays:
            return
        endpoints: list[str] = []
        for gateway_port, (target_host, target_port) in self._relays.items():
            endpoints += [f"{self.gateway}:{gateway_port}", f"{target_host}:{target_port}"]
        # Its stderr is ours: pytest shows what it complains about (an unreachable target) with the test.
        relay = _spawn([sys.executable, "-m", "tests.support.tcp_relay", *endpoints], stdout=subprocess.PIPE)
        self._processes.append(relay)
        _wait_ready(relay, "the PostgreSQL/Redis relay")

    def _check_connectivity(self) -> None:
        # Whatever else on this machine drops the lab's traffic (an nft ruleset, an INPUT policy) should fail
        # here, saying so, rather than as a timeout in some test.
        failures: list[str] = []
        with socket.socket() as gateway_listener:  # in the root namespace: the relays' side
            gateway_listener.bind((self.gateway, 0))
            gateway_listener.listen(len(self._hosts))
            for host in self._hosts.values():
                failures += _probe(host, self.gateway, gateway_listener.getsockname()[1])
        first, *others = self._hosts.values()
        with _socket_in_namespace(first.namespace) as host_listener:  # host to host: across the bridge
            host_listener.bind((first.address, 0))
            host_listener.listen(len(self._hosts))
            for host in others:
                failures += _probe(host, first.address, host_listener.getsockname()[1])
        if failures:
            raise RuntimeError(
                "network lab: traffic is dropped on this machine (check `iptables -S`, `nft list ruleset`, "
                f"`sysctl net.bridge`): {'; '.join(failures)}"
            )


def _probe(host: Host, address: str, port: int) -> list[str]:
    try:
        host.connect(address, port, timeout=_PROBE_TIMEOUT_SECONDS).close()
    except OSError as error:
        return [f"{host.name} cannot connect to {address}:{port} ({error})"]
    return []


# --- processes


def _spawn(
    args: Sequence[str],
    *,
    stdout: int | IO[bytes],
    stderr: int | IO[bytes] | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    # Its own session, so that stopping it signals its whole process group, children included; and it dies with
    # this process, so a crashed test run leaves no relay or server running (the kernel means the parent *thread*:
    # start processes from the main thread, or another that lives as long as they should).
    return subprocess.Popen(
        dying_with_parent(args), cwd=_REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        start_new_session=True,
    )  # fmt: skip


def _wait_ready(process: subprocess.Popen[bytes], what: str) -> None:
    """Wait for the "ready" line that the relay and the netem queue print once they serve."""
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], _READY_TIMEOUT_SECONDS)
    if not readable or process.stdout.readline().strip() != b"ready":
        process.kill()
        raise RuntimeError(f"{what} did not start (exit code {process.wait()}); its stderr is in the test output")


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group, SIGKILL those still there after _STOP_TIMEOUT_SECONDS, reap every process."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_SECONDS
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    for process in processes:
        if process.stdout is not None:
            process.stdout.close()


def _signal_group(process: subprocess.Popen[bytes], signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal_number)


def _socket_in_namespace(namespace: str) -> socket.socket:
    """A TCP socket of `namespace`. A socket stays in the namespace it was created in, and setns() moves only the
    calling thread, so a throwaway thread enters the namespace, creates the socket and ends."""

    def create() -> socket.socket:
        with open(f"/run/netns/{namespace}") as namespace_file:
            if _libc.setns(namespace_file.fileno(), _CLONE_NEWNET) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"setns into {namespace}: {os.strerror(error)}")
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    with ThreadPoolExecutor(max_workers=1) as one_thread:
        return one_thread.submit(create).result()


# --- what labs leave on the machine


def _run(args: Sequence[str], *, stdin: str | None = None) -> str:
    """Run a command to completion and return its stdout; RuntimeError with its stderr if it fails."""
    result = subprocess.run(list(args), input=stdin, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"`{shlex.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _claim_run_id() -> tuple[str, int]:
    """A new run id and the descriptor that holds its lock, for as long as the lab lives."""
    while True:
        run_id = secrets.token_hex(3)
        try:
            descriptor = os.open(STATE_DIR / f"{run_id}.lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return run_id, descriptor


def _sweep_stale_runs() -> None:
    """Remove what dead runs left: namespaces (and the processes in them), interfaces, firewall rules, lock files."""
    run_ids = {*_namespaces_by_run(), *_netns_config_dirs_by_run(), *_links_by_run(), *_forward_rules_by_run()}
    run_ids |= {path.stem for path in STATE_DIR.glob("*.lock") if _RUN_ID.fullmatch(path.stem)}
    for run_id in run_ids:
        lock_path = STATE_DIR / f"{run_id}.lock"
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue  # a live run holds it
        try:
            _remove_run(run_id)
        finally:
            lock_path.unlink(missing_ok=True)
            os.close(descriptor)


def _remove_run(run_id: str) -> list[str]:
    """Kill the processes in a run's namespaces, delete its namespaces (and their /etc/netns files), interfaces and
    firewall rules; return whatever still exists afterwards."""
    namespaces = _namespaces_by_run().get(run_id, [])
    for namespace in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False).stdout
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    # Deleting the root end of a veth pair deletes the end in the namespace too. -force: go on after an error;
    # what could not be deleted shows up in the check below.
    commands = [f"link delete {link}" for link in _links_by_run().get(run_id, [])]
    commands += [f"netns delete {namespace}" for namespace in namespaces]
    if commands:
        batch = "\n".join(commands)
        subprocess.run(["ip", "-force", "-batch", "-"], input=batch, capture_output=True, text=True, check=False)
    for delete_rule in _forward_rules_by_run().get(run_id, []):
        subprocess.run(delete_rule, capture_output=True, check=False)
    for config_dir in _netns_config_dirs_by_run().get(run_id, []):
        shutil.rmtree(NETNS_CONFIG_DIR / config_dir, ignore_errors=True)
    return [
        *_namespaces_by_run().get(run_id, []),
        *(str(NETNS_CONFIG_DIR / config_dir) for config_dir in _netns_config_dirs_by_run().get(run_id, [])),
        *_links_by_run().get(run_id, []),
        *(shlex.join(rule) for rule in _forward_rules_by_run().get(run_id, [])),
    ]


def _namespaces_by_run() -> dict[str, list[str]]:
    entries = json.loads(_run(["ip", "-json", "netns", "list"]) or "[]")
    return _group_by_run((entry["name"] for entry in entries), _NAMESPACE_NAME)


def _netns_config_dirs_by_run() -> dict[str, list[str]]:
    names = [path.name for path in NETNS_CONFIG_DIR.iterdir()] if NETNS_CONFIG_DIR.is_dir() else []
    return _group_by_run(names, _NAMESPACE_NAME)


def _links_by_run() -> dict[str, list[str]]:
    entries = json.loads(_run(["ip", "-json", "link", "show"]) or "[]")
    return _group_by_run((entry["ifname"] for entry in entries), _LINK_NAME)


def _group_by_run(names: Iterable[str], pattern: re.Pattern[str]) -> dict[str, list[str]]:
    by_run: dict[str, list[str]] = {}
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            by_run.setdefault(match.group(1), []).append(name)
    return by_run


def _iptables_commands() -> list[list[str]]:
    """The iptables front ends whose tables this machine uses: nft, and legacy when its filter table exists."""
    commands = [["iptables-nft", "-w"]] if shutil.which("iptables-nft") else []
    # Only when it exists: listing a legacy table would create it.
    legacy_tables = Path("/proc/net/ip_tables_names")
    if shutil.which("iptables-legacy") and legacy_tables.exists() and "filter" in legacy_tables.read_text().split():
        commands.append(["iptables-legacy", "-w"])
    if not commands and shutil.which("iptables"):
        commands.append(["iptables", "-w"])
    return commands


def _forward_chain(iptables: Sequence[str]) -> list[str]:
    output = _run([*iptables, "-S", "FORWARD"])
    return [line for line in output.splitlines() if line and not line.startswith("#")]


def _forward_rules_by_run() -> dict[str, list[list[str]]]:
    """Per run id, the commands that delete its FORWARD rules."""
    by_run: dict[str, list[list[str]]] = {}
    for iptables in _iptables_commands():
        for rule in _forward_chain(iptables):
            match = _RULE_COMMENT.search(rule)
            if match and rule.startswith("-A FORWARD "):
                by_run.setdefault(match.group(1), []).append([*iptables, "-D", *shlex.split(rule)[1:]])
    return by_run


def _free_subnet() -> ipaddress.IPv4Network:
    """The first 10.<n>.0.0/24, n in 200..254, that overlaps no address or route of the root namespace (other
    labs' bridges included)."""
    taken = [
        ipaddress.IPv4Interface(f"{address['local']}/{address['prefixlen']}").network
        for link in json.loads(_run(["ip", "-json", "-4", "address", "show"]))
        for address in link.get("addr_info", [])
    ]
    taken += [
        ipaddress.IPv4Network(route["dst"], strict=False)
        for route in json.loads(_run(["ip", "-json", "-4", "route", "show", "table", "all"]))
        if route["dst"] != "default"
    ]
    for octet in _SUBNET_SECOND_OCTETS:
        candidate = ipaddress.IPv4Network(f"10.{octet}.0.0/24")
        if not any(candidate.overlaps(network) for network in taken):
            return candidate
    raise RuntimeError("network lab: every 10.200-254.0.0/24 subnet is in use")


_open_labs: set[NetworkLab] = set()


@atexit.register
def _close_forgotten_labs() -> None:
    # A safety net for labs a test entered without closing: atexit runs on a normal exit, an unhandled exception
    # and sys.exit. After a SIGKILL, the next lab's sweep cleans up instead.
    for lab in list(_open_labs):
        lab.close()
