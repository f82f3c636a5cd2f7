"""The `voiceassist` command: run servers and the whole mesh, render Envoy's configuration, operate the system."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import click

from services import envoy_config, launcher
from services.audit import server as audit_server
from services.audit.cli import audit as audit_group
from services.auth import server as auth_server
from services.core import registry
from services.core.errors import ServiceError
from services.core.runtime import Runtime
from services.core.server import ServiceFactory, serve
from services.core.settings import ROOT, core_settings
from services.rag import server as rag_server
from services.search import server as search_server
from services.search.cli import kb as kb_group
from services.voice import server as voice_server
from services.voice.cli import voice as voice_group

FACTORIES: dict[str, ServiceFactory] = {
    "auth": auth_server.build,
    "audit": audit_server.build,
    "search": search_server.build,
    "rag": rag_server.build,
    "voice": voice_server.build,
}


@click.group()
def main() -> None:
    """VoiceAssist Mesh: a medical voice assistant's backend as a gRPC service mesh."""


@main.command("serve")
@click.argument("service", type=click.Choice(["all", *FACTORIES]))
@click.option("--port", type=int, help="gRPC port (default: the registry's, or 50050 for all).")
@click.option("--metrics-port", type=int, help="Prometheus port (default: the registry's).")
@click.option("--no-metrics", is_flag=True, help="Do not serve Prometheus metrics.")
def serve_command(service: str, port: int | None, metrics_port: int | None, no_metrics: bool) -> None:
    """Host one service (mesh mode) or all of them in this process (embedded mode)."""
    if service == "all":
        factories = FACTORIES
        port = port or registry.EMBEDDED_PORT
        metrics_port = metrics_port or registry.EMBEDDED_METRICS_PORT
    else:
        factories = {service: FACTORIES[service]}
        spec = registry.spec(service)
        port = port or spec.port
        metrics_port = metrics_port or spec.metrics_port
    asyncio.run(
        serve(factories, settings=core_settings(), port=port, metrics_port=None if no_metrics else metrics_port)
    )


@main.command("envoy-config")
@click.option("--target", type=click.Choice([*envoy_config.TARGETS, "all"]), default="all", show_default=True)
@click.option("--check", is_flag=True, help="Exit 1 when a checked-in file differs instead of writing it.")
def envoy_config_command(target: str, check: bool) -> None:
    """Render envoy/envoy*.yaml from the service registry and the compiled contracts."""
    stale = []
    for name in envoy_config.TARGETS if target == "all" else (target,):
        text = envoy_config.render(envoy_config.standard_target(name, core_settings()))
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


@main.command("up")
@click.option("--mesh", is_flag=True, help="One process per service (PostgreSQL and Redis from settings).")
def up_command(mesh: bool) -> None:
    """Start the whole system with Envoy in front; Ctrl-C stops everything cleanly."""
    settings = core_settings()
    logs = ROOT / "data" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if mesh:
            for spec in registry.SERVICES:
                processes.append(
                    launcher.start_server(spec.name, spec.port, spec.metrics_port, log_path=logs / f"{spec.name}.log")
                )
            targets = [(f"127.0.0.1:{s.port}", s.grpc_service) for s in registry.SERVICES]
        else:
            processes.append(
                launcher.start_server(
                    "all", registry.EMBEDDED_PORT, registry.EMBEDDED_METRICS_PORT, log_path=logs / "voiceassist.log"
                )
            )
            targets = [(f"127.0.0.1:{registry.EMBEDDED_PORT}", s.grpc_service) for s in registry.SERVICES]
        config = envoy_config.checked_in_path("mesh" if mesh else "embedded")
        processes.append(launcher.start_envoy(config, log_path=logs / "envoy.log"))
        for address, name in targets:
            launcher.wait_healthy(address, [name], timeout=180)
        launcher.wait_envoy_ready(settings.envoy_admin_port)
        _print_urls(settings.envoy_port, logs)
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("stopping...")
        codes = launcher.stop_all(processes)
        click.echo(f"stopped (exit codes {codes})")


@main.command("probe")
@click.argument("address")
@click.argument("service", default="")
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for SERVING.")
def probe_command(address: str, service: str, timeout: float) -> None:
    """Exit 0 when gRPC health at ADDRESS reports SERVICE as SERVING (container health checks)."""
    try:
        launcher.wait_healthy(address, [service], timeout=timeout)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def users() -> None:
    """Manage accounts directly in the auth database."""


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
    """Create the first admin, or promote an existing account to admin."""

    async def run() -> str:
        runtime = Runtime(core_settings(), hosted=(), self_address="")
        accounts, _keys, db = await auth_server.build_accounts(runtime)
        try:
            return (await accounts.create_admin(email, password, full_name)).id
        finally:
            await db.close()
            await runtime.close()

    try:
        click.echo(f"admin {email} ready (id {asyncio.run(run())})")
    except ServiceError as exc:
        raise click.ClickException(f"{exc.reason}: {exc.message}") from None


def _print_urls(port: int, logs: Path) -> None:
    click.echo(
        f"""
VoiceAssist Mesh is up.
  JSON / gRPC / gRPC-Web   http://127.0.0.1:{port}
  try                      curl -s http://127.0.0.1:{port}/v1/auth/jwks
                           grpcurl -plaintext 127.0.0.1:{port} list
  Envoy admin              http://127.0.0.1:9901
  logs                     {logs}
Press Ctrl-C to stop."""
    )


main.add_command(audit_group)
main.add_command(kb_group)
main.add_command(voice_group)

if __name__ == "__main__":
    main()
