"""The `voiceassist` command: run servers and the whole mesh, render Envoy's configuration, operate the system."""

from __future__ import annotations

import asyncio
import importlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import grpc
import uvloop
from pydantic import SecretStr

from services import launcher
from services.control_plane import envoy_config
from services.control_plane.authority import Authority
from services.control_plane.settings import control_plane_settings
from services.core import identity, registry
from services.core.certificates import CertificateUnavailable, OperatorCertificate
from services.core.errors import ServiceError
from services.core.runtime import Runtime
from services.core.server import IdentitySource, ServiceFactory, StartupRefused, serve
from services.core.settings import ROOT, CoreSettings, core_settings, local_address
from services.supervisor import Child, StartupError, Supervisor

# The module whose `build(runtime)` makes each service, imported only by a process that hosts it: each brings heavy
# dependencies no other service needs (onnxruntime and Qdrant for search, spaCy and Presidio for rag, ...).
SERVERS = {
    "auth": "services.auth.server",
    "audit": "services.audit.server",
    "search": "services.search.server",
    "rag": "services.rag.server",
    "voice": "services.voice.server",
}
CONTROL_PLANE_SERVER = "services.control_plane.server"


class LazyGroup(click.Group):
    """A group whose subcommands named in `lazy` ("module:attribute") are imported when used (click's documented
    pattern): a server process does not load the operators' command-line clients."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, attribute = self.lazy[cmd_name].split(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command


@click.group(
    cls=LazyGroup,
    lazy={"audit": "services.audit.cli:audit", "kb": "services.search.cli:kb", "voice": "services.voice.cli:voice"},
)
def main() -> None:
    """VoiceAssist Mesh: a medical voice assistant's backend as a gRPC service mesh."""
    # Everything this system writes (databases with password hashes and keys, the index, logs that name accounts)
    # is its owner's alone: files 0600, folders 0700.
    os.umask(0o077)


def factories(servers: dict[str, str]) -> dict[str, ServiceFactory]:
    """The `build` of each service in `servers` (name -> server module), importing those modules only."""
    return {service: importlib.import_module(module).build for service, module in servers.items()}


def _run_server(
    servers: dict[str, str], name: str, port: int, metrics_port: int | None, identity: IdentitySource | None = None
) -> None:
    try:
        # uvloop: grpc.aio runs on any asyncio loop, and with uvloop's the auth service spends a fifth less CPU per read
        # (the PostgreSQL and Redis sockets are asyncio's, not gRPC's). Not where voice is hosted: it starts a
        # process per spoken sentence, and under uvloop's (libuv's) spawning one now and then died of SIGSEGV before
        # it ran (espeak-ng, in loaded CI runs); asyncio's own loop spawns through Python's subprocess.
        run = asyncio.run if "voice" in servers else uvloop.run
        run(serve(factories(servers), settings=core_settings(), port=port, metrics_port=metrics_port,
                  identity_source=identity))  # fmt: skip
    except StartupRefused as exc:
        raise click.ClickException(f"{name}: {exc}") from None


def _supervise(supervisor: Supervisor, on_ready: Callable[[], None]) -> None:
    """Start the children, keep them running until Ctrl-C or SIGTERM, stop them in order. Exits non-zero when
    the start failed or a child was left down."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        supervisor.start()
        on_ready()
        while True:
            supervisor.watch_once()
            time.sleep(0.2)
    except StartupError as exc:
        click.echo(f"voiceassist: {exc}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the orderly stop short
        click.echo("stopping...", err=True)
        codes = supervisor.stop()
        click.echo("stopped (" + ", ".join(f"{name}: {code}" for name, code in codes.items()) + ")", err=True)
    if supervisor.down():
        raise SystemExit(1)


def _refuse_workers(service: str, workers: int, settings: CoreSettings) -> None:
    blockers = settings.scale_blockers(service)
    if workers > 1 and blockers:
        raise click.ClickException(
            f"{service} cannot run {workers} workers: without {' and '.join(blockers)} its state is per process "
            "(set them to the shared PostgreSQL / Redis / Qdrant server, or run one worker)"
        )


@main.command("serve")
@click.argument("service", type=click.Choice(["all", *SERVERS]))
@click.option("--workers", type=click.IntRange(1, registry.MAX_WORKERS), default=1, show_default=True,
              help="Processes of SERVICE, each its own endpoint: worker i listens on port + i (metrics port + i).")
@click.option("--port", type=int, help="gRPC port of the first worker (default: <NAME>_PORT, EMBEDDED_PORT for all).")
@click.option("--metrics-port", type=int, help="Prometheus port of the first worker (default: <NAME>_METRICS_PORT).")
@click.option("--no-metrics", is_flag=True, help="Do not serve Prometheus metrics.")
def serve_command(service: str, workers: int, port: int | None, metrics_port: int | None, no_metrics: bool) -> None:
    """Host one service (mesh mode) or all of them in this process (embedded mode)."""
    settings = core_settings()
    if service == "all":
        if workers > 1:
            raise click.ClickException("`serve all` is one process by design; run the services one by one to scale")
        port = port or settings.embedded_port
        metrics = None if no_metrics else metrics_port or settings.embedded_metrics_port
        _run_server(SERVERS, "voiceassist", port, metrics)
        return
    port = port or settings.port_of(service)
    metrics = None if no_metrics else metrics_port or settings.metrics_port_of(service)
    if workers == 1:
        _run_server({service: SERVERS[service]}, service, port, metrics)
        return
    _refuse_workers(service, workers, settings)
    operator = _operator(settings)
    children = [_worker(service, i, workers, port, metrics, settings, operator=operator) for i in range(workers)]
    _supervise(Supervisor([children], _report), lambda: click.echo(f"{service}: {workers} workers serving", err=True))


@main.command("control-plane")
@click.option("--port", type=int, help="gRPC port (default: CONTROL_PLANE_PORT).")
@click.option("--metrics-port", type=int, help="Prometheus port (default: CONTROL_PLANE_METRICS_PORT).")
@click.option("--no-metrics", is_flag=True, help="Do not serve Prometheus metrics.")
def control_plane_command(port: int | None, metrics_port: int | None, no_metrics: bool) -> None:
    """Serve Envoy's configuration over xDS, with the endpoints of the workers that announce themselves."""
    settings = core_settings()
    metrics = None if no_metrics else metrics_port or settings.control_plane_metrics_port
    # Its certificate comes from its own authority, not from a control plane to enroll with.
    own_certificates = importlib.import_module(CONTROL_PLANE_SERVER).own_certificates
    _run_server({registry.CONTROL_PLANE.name: CONTROL_PLANE_SERVER}, "control-plane",
                port or settings.control_plane_port, metrics, own_certificates)  # fmt: skip


@main.command("envoy-config")
@click.option("--target", type=click.Choice([*envoy_config.TARGETS, "all"]), default="all", show_default=True)
@click.option("--check", is_flag=True, help="Exit 1 when a checked-in file differs instead of writing it.")
def envoy_config_command(target: str, check: bool) -> None:
    """Render envoy/envoy*.yaml from the service registry and the compiled contracts (default settings)."""
    stale = []
    for name in envoy_config.TARGETS if target == "all" else (target,):
        text = envoy_config.render(envoy_config.standard_target(name, CoreSettings(_env_file=None)))
        path = envoy_config.checked_in_path(name)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            click.echo(f"wrote {path.relative_to(ROOT)}")
    if stale:
        raise click.ClickException(f"stale: {', '.join(stale)}; run `voiceassist envoy-config`")


def _report(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def _worker(service: str, index: int, workers: int, port: int, metrics: int | None, settings: CoreSettings,
            env: dict[str, str] | None = None, operator: OperatorCertificate | None = None) -> Child:  # fmt: skip
    """Worker `index` (0-based) of a service that runs `workers` of them; probed with `operator`'s certificate under
    MESH_TLS."""
    name = service if workers == 1 else f"{service}#{index + 1}"
    address = f"{local_address(settings.grpc_host)}:{port + index}"
    grpc_service = registry.spec(service).grpc_service

    def tls() -> launcher.Tls | None:
        return launcher.Tls.presenting(operator(), service) if operator else None

    return Child(
        name, launcher.server_args(service, port + index, metrics + index if metrics else None),
        settings.logs / f"{name.replace('#', '-')}.log",
        lambda: _is_serving(address, [grpc_service], tls), env=env or {}, group=service,
    )  # fmt: skip


def _operator(settings: CoreSettings) -> OperatorCertificate | None:
    """The certificate the launcher probes mesh servers with (MESH_TLS; issued once the control plane serves)."""
    return OperatorCertificate(settings) if settings.mesh_tls else None


def _verifying(settings: CoreSettings, server_name: str = "") -> Callable[[], launcher.Tls | None]:
    """How to reach Envoy's listener or the control plane: TLS verified against the mesh's root (MESH_TLS; read
    when probed, since the control plane writes it at its start), else plaintext."""
    if not settings.mesh_tls:
        return lambda: None
    return lambda: launcher.Tls.verifying(settings.trust_bundle_path.read_bytes(), server_name)


def _is_serving(address: str, services: list[str], tls: Callable[[], launcher.Tls | None]) -> bool:
    """A readiness probe: gRPC health over `tls()`; not yet while what TLS needs is missing (the control plane writes
    the mesh's root when it starts, and issues the probe's certificate once it serves)."""
    try:
        return launcher.is_serving(address, services, tls=tls())
    except (OSError, grpc.RpcError, CertificateUnavailable):
        return False


def _ports_in_use(wanted: list[tuple[str, str, int]]) -> list[str]:
    """The (what, host, port) entries whose port is taken."""
    return [f"{what}: {host}:{port}" for what, host, port in wanted if launcher.port_in_use(host, port)]


def _system(settings: CoreSettings, mesh: bool) -> tuple[list[list[Child]], list[tuple[str, str, int]]]:
    """The stages `up` starts, and every (what, host, port) they will listen on."""
    run = settings.data_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    metrics = settings.metrics_enabled
    ports = [
        ("ENVOY_PORT", settings.envoy_host, settings.envoy_port),
        ("ENVOY_ADMIN_PORT", "127.0.0.1", settings.envoy_admin_port),
    ]
    everything = [s.grpc_service for s in registry.SERVICES]
    if mesh:
        cp = settings.control_plane_port
        cp_address = f"{local_address(settings.grpc_host)}:{cp}"
        env = {"CONTROL_PLANE_ADDR": settings.control_plane_addr, "MESH_TLS": str(settings.mesh_tls),
               "MESH_JOIN_TOKEN": settings.mesh_join_token.get_secret_value()}  # fmt: skip
        control_tls, operator = _verifying(settings, identity.CONTROL_PLANE), _operator(settings)
        control = Child(
            "control-plane", launcher.control_plane_args(cp, settings.control_plane_metrics_port if metrics else None),
            settings.logs / "control-plane.log",
            lambda: _is_serving(cp_address, [registry.CONTROL_PLANE.grpc_service], control_tls), env=env,
        )  # fmt: skip
        ports.append(("CONTROL_PLANE_PORT", settings.grpc_host, cp))
        if metrics:
            ports.append(("CONTROL_PLANE_METRICS_PORT", settings.metrics_host, settings.control_plane_metrics_port))
        workers = []
        for spec in registry.SERVICES:
            count, port, metrics_port = settings.workers_of(spec.name), settings.port_of(spec.name), None
            if metrics:
                metrics_port = settings.metrics_port_of(spec.name)
                ports += [(f"{spec.name.upper()}_METRICS_PORT + {i}", settings.metrics_host, metrics_port + i)
                          for i in range(count)]  # fmt: skip
            ports += [(f"{spec.name.upper()}_PORT + {i}", settings.grpc_host, port + i) for i in range(count)]
            workers += [_worker(spec.name, i, count, port, metrics_port, settings, env, operator) for i in range(count)]
        config = run / "envoy.mesh.yaml"
        config.write_text(envoy_config.render(envoy_config.xds_target(settings, ("127.0.0.1", cp))))
        stages = [[control], workers]
    else:
        port = settings.embedded_port
        metrics_port = settings.embedded_metrics_port if metrics else None
        server = Child(
            "voiceassist", launcher.server_args("all", port, metrics_port), settings.logs / "voiceassist.log",
            lambda: launcher.is_serving(f"{local_address(settings.grpc_host)}:{port}", everything),
        )  # fmt: skip
        ports.append(("EMBEDDED_PORT", settings.grpc_host, port))
        if metrics_port:
            ports.append(("EMBEDDED_METRICS_PORT", settings.metrics_host, metrics_port))
        config = run / "envoy.yaml"
        config.write_text(envoy_config.render(envoy_config.embedded_target(settings, str(envoy_config.DESCRIPTOR))))
        stages = [[server]]
    # Envoy is ready when every service answers health checks through its listener (routes and endpoints in place).
    edge_tls = _verifying(settings) if mesh else lambda: None
    envoy = Child(
        "envoy", launcher.envoy_args(config), settings.logs / "envoy.log",
        lambda: _is_serving(settings.envoy_address, everything, edge_tls),
    )  # fmt: skip
    return [*stages, [envoy]], ports


def _mesh_settings(settings: CoreSettings) -> CoreSettings:
    """Mesh mode's settings: the control plane on this host unless CONTROL_PLANE_ADDR names another; mutual TLS
    unless MESH_TLS says otherwise, with a join token made for this run when none is set (only this launcher and its
    children know it)."""
    local = f"{local_address(settings.grpc_host)}:{settings.control_plane_port}"
    update: dict[str, Any] = {"control_plane_addr": settings.control_plane_addr or local}
    if "mesh_tls" not in settings.model_fields_set:
        update["mesh_tls"] = True
    if not settings.mesh_join_token.get_secret_value():
        update["mesh_join_token"] = SecretStr(secrets.token_urlsafe(32))
    return settings.model_copy(update=update)


@main.command("up")
@click.option("--mesh", is_flag=True, help="One process per service and worker, a control plane driving Envoy "
              "(PostgreSQL and Redis from settings).")  # fmt: skip
def up_command(mesh: bool) -> None:
    """Start the whole system with Envoy in front, keep it running (a process that dies is restarted), and stop
    everything cleanly on Ctrl-C or SIGTERM."""
    settings = core_settings()
    if mesh:
        for spec in registry.SERVICES:
            _refuse_workers(spec.name, settings.workers_of(spec.name), settings)
        settings = _mesh_settings(settings)
    elif settings.mesh_tls:
        raise click.ClickException("embedded mode is plaintext on loopback: unset MESH_TLS, or run `up --mesh`")
    stages, ports = _system(settings, mesh)
    taken = _ports_in_use(ports)
    if taken:
        raise click.ClickException(
            "ports already in use (another system, or an earlier run still stopping?) - change these settings:\n  "
            + "\n  ".join(taken)
        )
    click.echo(f"starting ({'mesh' if mesh else 'embedded'} mode); logs in {settings.logs}", err=True)
    _supervise(Supervisor(stages, _report), lambda: _print_urls(settings, mesh))


@main.command("probe")
@click.argument("address")
@click.argument("service", default="")
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for SERVING.")
@click.option("--tls-server-name", default="", help="Over TLS, verifying the server's certificate (it must name this "
              "workload) against MESH_TRUST_BUNDLE: the control plane with MESH_TLS. Services answer probes on their "
              "plaintext GRPC_HEALTH_PORT instead.")  # fmt: skip
def probe_command(address: str, service: str, timeout: float, tls_server_name: str) -> None:
    """Exit 0 when gRPC health at ADDRESS reports SERVICE as SERVING (container health checks)."""
    tls = launcher.Tls.verifying(core_settings().trust_bundle_path.read_bytes(), tls_server_name) if tls_server_name \
        else None
    try:
        launcher.wait_healthy(address, [service], timeout=timeout, tls=tls)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("mesh-ca")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def mesh_ca_command(directory: Path) -> None:
    """Make the mesh's certificate authority in DIRECTORY (root.key, encrypted with CONTROL_PLANE_CA_PASSPHRASE, and
    root.pem), for a deployment to keep in a secret; an existing one is only checked (the passphrase opens it)."""
    try:
        authority = Authority.configured(control_plane_settings(), directory)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    expires = authority.root.not_valid_after_utc.date().isoformat()
    click.echo(f"mesh CA in {directory}: root.pem (the trust bundle, public) and root.key; valid until {expires}")


@main.group()
def users() -> None:
    """Manage accounts directly in the auth database; each change is in the audit ledger when a command ends."""


def _with_accounts(use: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run `use(accounts)` against the auth database of these settings (the auth server need not run). Its audit
    events are committed to the ledger before it returns; an unreachable ledger fails the command before `use`."""

    async def run() -> Any:
        settings = core_settings()
        ledger_sink = importlib.import_module("services.audit.ledger_sink").LedgerSink
        runtime = Runtime(settings, hosted=(), self_address="", audit_sink=await ledger_sink.open(settings))
        accounts, _keys, db = await importlib.import_module(SERVERS["auth"]).build_accounts(runtime)
        try:
            return await use(accounts)
        finally:
            await db.close()
            await runtime.close()

    try:
        return asyncio.run(run())
    except ServiceError as exc:
        raise click.ClickException(f"{exc.reason}: {exc.message}") from None


@users.command("create-admin")
@click.argument("email")
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    envvar="VOICEASSIST_ADMIN_PASSWORD",
    help="Prompted when not given (or from VOICEASSIST_ADMIN_PASSWORD).",
)
@click.option("--full-name", default="", help="Display name.")
def create_admin_command(email: str, password: str, full_name: str) -> None:
    """Create an admin account (an existing account: `users promote`)."""
    user = _with_accounts(lambda accounts: accounts.create_admin(email, password, full_name))
    click.echo(f"admin {email} ready (id {user.id})")


@users.command("promote")
@click.argument("email")
def promote_command(email: str) -> None:
    """Make an existing account an active admin; its password stays as it is."""
    user = _with_accounts(lambda accounts: accounts.promote_admin(email))
    click.echo(f"{email} is an admin now (id {user.id})")


def _print_urls(settings: CoreSettings, mesh: bool) -> None:
    address = settings.envoy_address
    workers = ", ".join(f"{s.name} x{settings.workers_of(s.name)}" for s in registry.SERVICES) if mesh else ""
    if settings.mesh_tls:
        roots = settings.trust_bundle_path
        url, curl, grpcurl = f"https://{address}", f"curl -s --cacert {roots}", f"grpcurl -cacert {roots}"
    else:
        url, curl, grpcurl = f"http://{address}", "curl -s", "grpcurl -plaintext"
    click.echo(
        f"""
VoiceAssist Mesh is up{f" ({workers})" if workers else ""}.
  JSON / gRPC / gRPC-Web   {url}
  try                      {curl} {url}/v1/auth/jwks
                           {grpcurl} {address} list
  Envoy admin              http://127.0.0.1:{settings.envoy_admin_port}
  logs                     {settings.logs}
Press Ctrl-C to stop."""
    )


if __name__ == "__main__":
    main()
