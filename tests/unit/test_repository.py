"""What must stay true of the repository: generated files fresh, contracts lint-clean, boundaries kept, the
deployment files consistent with the service registry."""

from __future__ import annotations

import filecmp
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.control_plane import envoy_config
from services.core import registry
from services.core.settings import ROOT, CoreSettings

BIN = Path(sys.executable).parent


def _run(
    *args: str, cwd: Path = ROOT, extra_env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    env = {**os.environ, "BUF_CACHE_DIR": str(ROOT / "build" / "buf-cache"), **(extra_env or {})}
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300, env=env, **kwargs)


def _differences(left: Path, right: Path) -> list[str]:
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [str(left / n) for n in cmp.left_only + cmp.right_only + cmp.diff_files]
    for sub in cmp.common_dirs:
        found += _differences(left / sub, right / sub)
    return found


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    result = _run(str(ROOT / "scripts" / "gen-protos"), str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert _differences(ROOT / "gen" / "python", tmp_path / "python") == []
    assert (ROOT / "gen" / "voiceassist.binpb").read_bytes() == (tmp_path / "voiceassist.binpb").read_bytes()


def test_descriptor_set_includes_error_details() -> None:
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "gen" / "voiceassist.binpb").read_bytes())
    names = {f.name for f in fds.file}
    assert {"google/rpc/error_details.proto", "google/rpc/status.proto", "google/api/annotations.proto"} <= names


@pytest.mark.parametrize("target", envoy_config.TARGETS)
def test_envoy_config_is_fresh_and_valid(target: str) -> None:
    path = envoy_config.checked_in_path(target)
    assert path.read_text() == envoy_config.render(envoy_config.standard_target(target, CoreSettings(_env_file=None)))
    if target != "cluster":  # the cluster config names a descriptor path inside the container image
        result = _run(str(BIN / "envoy"), "--mode", "validate", "-c", str(path), "--disable-hot-restart")
        assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_is_clean() -> None:
    result = _run(str(BIN / "buf"), "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_an_undocumented_field(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copytree(ROOT / "third_party", tmp_path / "third_party")
    shutil.copy(ROOT / "buf.yaml", tmp_path)
    proto = tmp_path / "proto" / "voiceassist" / "auth" / "v1" / "auth.proto"
    proto.write_text(
        proto.read_text().replace("message GetJwksRequest {}", "message GetJwksRequest {\n  string x = 1;\n}")
    )
    result = _run(str(BIN / "buf"), "lint", cwd=tmp_path)
    assert result.returncode != 0 and "should have a non-empty comment" in result.stdout


def test_import_boundaries_hold() -> None:
    result = _run(str(BIN / "lint-imports"))
    assert result.returncode == 0, result.stdout


def test_a_service_importing_another_service_fails_lint(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "services", tmp_path / "services", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "services" / "rag" / "server.py").open("a") as f:
        f.write("\nfrom services.search import server as _search_server  # noqa: E402\n")
    result = subprocess.run(
        [str(BIN / "lint-imports")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT / 'gen' / 'python'}"},
    )  # fmt: skip
    assert result.returncode != 0
    assert "services.rag" in result.stdout and "services.search" in result.stdout


def test_compose_file_is_valid_and_matches_the_registry() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose is missing: run scripts/system-deps")
    # The join token is the one value compose cannot default: it refuses to start without it.
    assert "MESH_JOIN_TOKEN" in _run(compose, "-f", "compose.yaml", "config", extra_env={"MESH_JOIN_TOKEN": ""}).stderr
    result = _run(compose, "-f", "compose.yaml", "config", extra_env={"MESH_JOIN_TOKEN": "t0ken"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    cp = registry.CONTROL_PLANE
    for spec in (*registry.SERVICES, cp):
        assert {str(spec.port), str(spec.metrics_port)} == set(services[spec.dns_name]["expose"]), spec.name
    # Mutual TLS: services are probed on their plaintext health-only port, the control plane over TLS.
    assert f"127.0.0.1:{cp.port}" in services[cp.dns_name]["healthcheck"]["test"]
    assert "--tls-server-name" in services[cp.dns_name]["healthcheck"]["test"]
    for spec in registry.SERVICES:
        env = services[spec.dns_name]["environment"]
        assert f"127.0.0.1:{env['GRPC_HEALTH_PORT']}" in services[spec.dns_name]["healthcheck"]["test"], spec.name
        assert env["CONTROL_PLANE_ADDR"] == f"{cp.dns_name}:{cp.port}"
        assert env[f"{spec.name.upper()}_ADDR"] == f"dns:///{spec.dns_name}:{spec.port}"
        assert env["MESH_TLS"] == "true" and env["MESH_JOIN_TOKEN"] == "t0ken"
    assert {"postgres", "redis", "qdrant", "envoy"} <= set(services)
    assert f"{ROOT}/envoy/envoy.cluster.yaml:/etc/envoy/envoy.yaml:ro" in services["envoy"]["volumes"]


def test_reads_are_declared_without_side_effects() -> None:
    """Envoy retries what a contract declares free of side effects; every GET route must be one of them."""
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "gen" / "voiceassist.binpb").read_bytes())
    reads = {m.path for m in envoy_config.methods() if m.idempotency in registry.RETRY_POLICIES}
    gets = set()
    for f in fds.file:
        for svc in f.service:
            for m in svc.method:
                rule = m.options.Extensions[annotations_pb2.http]
                if rule.get:
                    gets.add(f"/{f.package}.{svc.name}/{m.name}")
    assert gets and gets <= reads
    writes = {"/voiceassist.auth.v1.AuthService/Login", "/voiceassist.rag.v1.RagService/Ask",
              "/voiceassist.search.v1.SearchService/DeleteDocument"}  # fmt: skip
    assert not writes & reads


K8S_OVERLAYS = ("dev", "prod")


@functools.cache
def _kustomize(overlay: str) -> str:
    result = _run("kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", f"k8s/overlays/{overlay}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def _manifests(overlay: str) -> dict[str, dict[str, dict]]:
    """The rendered overlay as {kind: {name: document}}; generated ConfigMaps under their unhashed names."""
    docs: dict[str, dict[str, dict]] = {}
    for doc in filter(None, yaml.safe_load_all(_kustomize(overlay))):
        name = doc["metadata"]["name"]
        if doc["kind"] in ("ConfigMap", "Secret"):  # generated: a content hash follows the name
            name = name.rsplit("-", 1)[0]
        docs.setdefault(doc["kind"], {})[name] = doc
    return docs


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_kubernetes_manifests_render_and_validate(overlay: str) -> None:
    result = _run(str(BIN / "kubernetes-validate"), "--strict", "-", input=_kustomize(overlay))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_kubernetes_manifests_match_the_registry(overlay: str) -> None:
    k8s = _manifests(overlay)
    config = k8s["ConfigMap"]["voiceassist-config"]["data"]
    cp = registry.CONTROL_PLANE
    assert config["CONTROL_PLANE_ADDR"] == f"{cp.dns_name}:{cp.port}"
    assert {p["port"] for p in k8s["Service"][cp.dns_name]["spec"]["ports"]} == {cp.port, cp.metrics_port}
    control = k8s["Deployment"][cp.dns_name]
    assert control["spec"]["replicas"] == 1 and control["spec"]["strategy"]["type"] == "Recreate"
    container = control["spec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in container["ports"]} == {cp.port, cp.metrics_port}
    # Mutual TLS: the control plane is probed over TLS, the services on their plaintext health-only port.
    probe = container["readinessProbe"]["exec"]["command"]
    assert f"127.0.0.1:{cp.port}" in probe and cp.grpc_service in probe and "--tls-server-name" in probe
    assert config["MESH_TLS"] == "true" and "MESH_JOIN_TOKEN" in k8s["Secret"]["voiceassist-secrets"]["data"]
    envoy = k8s["Deployment"]["envoy"]["spec"]["template"]["spec"]["containers"][0]
    listeners = {int(config["ENVOY_PORT"]), int(config["ENVOY_REDIRECT_PORT"])}
    assert {p["containerPort"] for p in envoy["ports"]} == listeners
    bootstrap = k8s["ConfigMap"]["envoy-config"]["data"]
    assert bootstrap == {"envoy.yaml": (ROOT / "envoy" / "envoy.cluster.yaml").read_text()}

    for spec in registry.SERVICES:
        assert config[f"{spec.name.upper()}_ADDR"] == f"dns:///{spec.dns_name}:{spec.port}"
        deployment = k8s["Deployment"][spec.dns_name]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert {p["containerPort"] for p in container["ports"]} == {spec.port, spec.metrics_port}, spec.name
        probe = {"port": int(config["GRPC_HEALTH_PORT"]), "service": spec.grpc_service}
        assert container["readinessProbe"]["grpc"] == probe, spec.name
        env = {e["name"]: e for e in container["env"]}
        assert env["GRPC_ADVERTISE_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, spec.name
        selector = deployment["spec"]["selector"]
        service = k8s["Service"][spec.dns_name]["spec"]
        assert service["clusterIP"] == "None" and service["selector"] == selector["matchLabels"], spec.name
        assert {p["name"]: p["port"] for p in service["ports"]} == {"grpc": spec.port, "metrics": spec.metrics_port}
        assert k8s["PodDisruptionBudget"][spec.dns_name]["spec"]["selector"] == selector, spec.name
        hpa = k8s["HorizontalPodAutoscaler"][spec.dns_name]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.dns_name}
        if overlay == "prod":
            assert deployment["spec"]["replicas"] >= 2 and hpa["minReplicas"] >= 2, spec.name


def test_env_example_lists_every_setting() -> None:
    import importlib

    from services.core.settings import ServiceSettings

    listed = {
        line.split("=", 1)[0].lstrip("# ").strip()
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line
    }
    classes = [CoreSettings]
    for spec in (*registry.SERVICES, registry.CONTROL_PLANE):
        if (ROOT / "services" / spec.name / "settings.py").exists():
            module = importlib.import_module(f"services.{spec.name}.settings")
            classes += [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, ServiceSettings)
                        and c is not ServiceSettings]  # fmt: skip
    wanted = set()
    for cls in classes:
        prefix = cls.model_config.get("env_prefix", "")
        wanted |= {f"{prefix}{name}".upper() for name in cls.model_fields}
    assert wanted - listed == set()
