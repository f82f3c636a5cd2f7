"""What must stay true of the repository: generated files fresh, contracts lint-clean, boundaries kept, the
deployment files consistent with the service registry."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services import envoy_config
from services.core import registry
from services.core.settings import ROOT, CoreSettings

BIN = Path(sys.executable).parent


def _run(*args: str, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "BUF_CACHE_DIR": str(ROOT / "build" / "buf-cache")}
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


def test_compose_file_is_valid_and_names_every_service() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose is missing: run scripts/system-deps")
    result = _run(compose, "-f", "compose.yaml", "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for spec in registry.SERVICES:
        assert spec.name in services, spec.name
        assert any(str(spec.port) in str(p) for p in services[spec.name].get("expose", [])), spec.name
    assert {"postgres", "redis", "qdrant", "envoy"} <= set(services)


def test_kubernetes_manifests_render_and_validate() -> None:
    rendered = _run("kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", "k8s")
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for spec in registry.SERVICES:
        container = deployments[spec.name]["spec"]["template"]["spec"]["containers"][0]
        assert {p["containerPort"] for p in container["ports"]} == {spec.port, spec.metrics_port}, spec.name
    result = _run(str(BIN / "kubernetes-validate"), "--strict", "-", input=rendered.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


def test_env_example_lists_every_setting() -> None:
    import importlib

    from services.core.settings import ServiceSettings

    listed = {
        line.split("=", 1)[0].lstrip("# ").strip()
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line
    }
    classes = [CoreSettings]
    for spec in registry.SERVICES:
        if (ROOT / "services" / spec.name / "settings.py").exists():
            module = importlib.import_module(f"services.{spec.name}.settings")
            classes += [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, ServiceSettings)
                        and c is not ServiceSettings]  # fmt: skip
    wanted = set()
    for cls in classes:
        prefix = cls.model_config.get("env_prefix", "")
        wanted |= {f"{prefix}{name}".upper() for name in cls.model_fields}
    assert wanted - listed == set()
