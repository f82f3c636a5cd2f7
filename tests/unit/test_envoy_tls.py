"""Envoy's side of mesh TLS: the bootstrap and the xDS resources Envoy accepts (`envoy --mode validate`), the
SDS secrets the control plane serves and renews, and an xDS stream that carries them only for the join token."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest, DiscoveryResponse

from services.control_plane import envoy_config
from services.control_plane.authority import Authority
from services.control_plane.server import ControlPlane, EnvoyCertificates
from services.control_plane.settings import ControlPlaneSettings
from services.control_plane.xds import LISTENERS, SECRETS, XDS_SERVICE, add_ads_to_server
from services.core import identity, interceptors, status
from services.core.server import StartupRefused
from services.core.settings import ROOT, CoreSettings

BIN = Path(sys.executable).parent
TOKEN = "test-join-token"
HOUR = datetime.timedelta(hours=1)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority.open(tmp_path / "ca", b"", HOUR)


def _core(**overrides: Any) -> CoreSettings:
    values: dict[str, Any] = {"mesh_tls": True, "mesh_join_token": TOKEN, "envoy_redirect_port": 18443}
    return CoreSettings(_env_file=None, **(values | overrides))


def _plane_settings(**overrides: Any) -> ControlPlaneSettings:
    return ControlPlaneSettings(_env_file=None, warm_up_seconds=0, **overrides)


def _validate(config: dict[str, Any] | str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run(
        [str(BIN / "envoy"), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_tls_bootstrap_is_valid_and_presents_the_join_token(authority: Authority, tmp_path: Path) -> None:
    target = envoy_config.xds_target(_core(), ("127.0.0.1", 7190))
    target = dataclasses.replace(target, trust_bundle=str(tmp_path / "ca" / "root.pem"))
    text = envoy_config.render(target)
    _validate(text, tmp_path)
    ads = yaml.safe_load(text)["dynamic_resources"]["ads_config"]["grpc_services"][0]
    assert ads["initial_metadata"] == [{"key": identity.JOIN_TOKEN_HEADER, "value": TOKEN}]
    socket = yaml.safe_load(text)["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
    assert socket["sni"] == identity.CONTROL_PLANE
    assert envoy_config.JOIN_TOKEN_PLACEHOLDER not in text


def test_a_bootstrap_without_a_token_renders_the_placeholder_and_says_how_to_complete_it() -> None:
    target = envoy_config.standard_target("cluster", CoreSettings(_env_file=None))
    text = envoy_config.render(target)
    assert target.tls and target.trust_bundle == envoy_config.CLUSTER_TRUST_BUNDLE
    assert f"value: {envoy_config.JOIN_TOKEN_PLACEHOLDER}" in text
    assert text.startswith(envoy_config.HEADER.format(target="cluster") + "# Mesh TLS: two things")


def _static_secret_references(node: Any) -> Any:
    """The resources with each SDS reference made a reference to a static secret of the bootstrap."""
    if isinstance(node, dict):
        return {k: _static_secret_references(v) for k, v in node.items() if k != "sds_config"}
    if isinstance(node, list):
        return [_static_secret_references(v) for v in node]
    return node


def test_envoy_accepts_every_tls_resource_with_the_secrets_the_control_plane_serves(
    authority: Authority, tmp_path: Path
) -> None:
    plane = ControlPlane(_core(), _plane_settings(), authority)
    snapshot = plane.cache.snapshot
    assert snapshot is not None
    assert set(snapshot.resources[SECRETS]) == {
        envoy_config.WORKLOAD_SECRET, envoy_config.MESH_ROOTS_SECRET,
        envoy_config.EDGE_SECRET, envoy_config.EDGE_ROOTS_SECRET,
    }  # fmt: skip
    assert set(snapshot.resources[LISTENERS]) == {envoy_config.LISTENER, envoy_config.REDIRECT_LISTENER}
    # The same dicts the control plane packed, as a static configuration with the secrets inline: Envoy builds
    # every TLS context (ciphers, certificate and key, validation) as it would from xDS.
    certificates = plane.mesh.certificates
    assert certificates is not None
    target = envoy_config.xds_target(_core(), ("127.0.0.1", 7190))
    target = dataclasses.replace(target, edge_hostname=certificates.hostnames[0])
    clusters = envoy_config.clusters(target)
    for cluster in clusters:
        if cluster.pop("eds_cluster_config", None):
            cluster |= {"type": "STATIC", "load_assignment": envoy_config.load_assignment(cluster["name"], [])}
    listeners = envoy_config.listeners(target)
    hcm = listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["rds"]
    hcm["route_config"] = envoy_config.route_configuration(target)
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": _static_secret_references(
            {"listeners": listeners, "clusters": clusters, "secrets": list(certificates.secrets.values())}
        ),
    }
    _validate(bootstrap, tmp_path)


def test_service_clusters_verify_the_service_identity_and_the_listener_allows_strong_tls_only() -> None:
    target = envoy_config.xds_target(_core(), ("127.0.0.1", 7190))
    auth = next(c for c in envoy_config.clusters(target) if c["name"] == "auth")
    context = auth["transport_socket"]["typed_config"]
    assert context["sni"] == "auth"
    validation = context["common_tls_context"]["combined_validation_context"]
    sans = validation["default_validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "URI", "matcher": {"exact": "spiffe://voiceassist/auth"}}]
    ingress, redirect = envoy_config.listeners(target)
    params = ingress["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]["tls_params"]
    assert params["tls_minimum_protocol_version"] == "TLSv1_2"
    assert all("GCM" in c or "CHACHA20" in c for c in params["cipher_suites"])
    assert all(c.startswith("ECDHE-") for c in params["cipher_suites"])
    # HSTS by the first filter: it sees every response on its way out, Envoy's own replies included.
    first = ingress["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
    [hsts] = first["typed_config"]["mutations"]["response_mutations"]
    assert hsts["append"]["header"] == {"key": "strict-transport-security", "value": envoy_config.HSTS}
    hcm = redirect["filter_chains"][0]["filters"][0]["typed_config"]
    [route] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert route["redirect"] == {"https_redirect": True, "port_redirect": target.listen_port}


def test_plaintext_mesh_has_no_secrets_and_no_tls() -> None:
    plane = ControlPlane(_core(mesh_tls=False), _plane_settings())
    snapshot = plane.cache.snapshot
    assert snapshot is not None and not snapshot.resources.get(SECRETS)
    target = envoy_config.xds_target(_core(mesh_tls=False), ("127.0.0.1", 7190))
    assert "transport_socket" not in str([*envoy_config.clusters(target), *envoy_config.listeners(target)])


def test_issued_certificates_are_renewed_at_two_thirds_of_their_lifetime(tmp_path: Path) -> None:
    short = Authority.open(tmp_path / "ca", b"", datetime.timedelta(seconds=3))
    certificates = EnvoyCertificates(short, _plane_settings())
    first = dict(certificates.secrets)
    assert not certificates.refresh()  # not due yet
    assert 1.0 <= certificates.next_check_seconds() <= 2.0
    time.sleep(2.1)
    assert certificates.refresh()
    for name in (envoy_config.WORKLOAD_SECRET, envoy_config.EDGE_SECRET):
        assert certificates.secrets[name] != first[name]
    assert certificates.secrets[envoy_config.MESH_ROOTS_SECRET] == first[envoy_config.MESH_ROOTS_SECRET]


@pytest.fixture
def edge_files(authority: Authority, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    issued = authority.issue([], dns_names=["api.example.test"])
    chain, key = tmp_path / "edge.pem", tmp_path / "edge.key"
    chain.write_bytes(issued.chain_pem + authority.trust_pem)  # leaf + the CA: the last one is what Envoy trusts
    key.write_bytes(issued.key_pem)
    yield chain, key


def test_a_provided_edge_certificate_is_served_and_reread_when_its_files_change(
    authority: Authority, edge_files: tuple[Path, Path]
) -> None:
    chain, key = edge_files
    settings = _plane_settings(edge_certificate_file=chain, edge_key_file=key, edge_hostnames="api.example.test")
    certificates = EnvoyCertificates(authority, settings)
    edge = certificates.secrets[envoy_config.EDGE_SECRET]["tls_certificate"]
    assert edge["certificate_chain"]["inline_string"] == chain.read_text()
    roots = certificates.secrets[envoy_config.EDGE_ROOTS_SECRET]["validation_context"]["trusted_ca"]
    assert roots["inline_string"] == authority.trust_pem.decode()
    assert not certificates.refresh()

    other = authority.issue([], dns_names=["api.example.test"])
    chain.write_bytes(other.chain_pem)  # mid-rotation: the new certificate, the old key
    os.utime(chain, ns=(1, 1))
    assert not certificates.refresh()
    assert certificates.secrets[envoy_config.EDGE_SECRET]["tls_certificate"] == edge
    key.write_bytes(other.key_pem)
    os.utime(key, ns=(2, 2))
    assert certificates.refresh()
    renewed = certificates.secrets[envoy_config.EDGE_SECRET]["tls_certificate"]
    assert renewed["certificate_chain"]["inline_string"] == other.chain_pem.decode()


def test_unusable_edge_files_refuse_the_start(authority: Authority, edge_files: tuple[Path, Path]) -> None:
    chain, key = edge_files
    key.write_bytes(authority.issue([identity.EDGE]).key_pem)
    with pytest.raises(StartupRefused, match="not the certificate's"):
        EnvoyCertificates(authority, _plane_settings(edge_certificate_file=chain, edge_key_file=key))
    with pytest.raises(StartupRefused, match="go together"):
        EnvoyCertificates(authority, _plane_settings(edge_certificate_file=chain))


def test_tls_needs_the_authority() -> None:
    with pytest.raises(ValueError, match="certificate authority"):
        ControlPlane(_core(), _plane_settings())


class _NoUsers:
    async def verify(self, token: str) -> Any:
        raise AssertionError("the xDS stream carries no user token")


async def test_the_xds_stream_serves_secrets_only_with_the_join_token_and_as_envoy_names_them(
    authority: Authority,
) -> None:
    plane = ControlPlane(_core(), _plane_settings(), authority)
    server = grpc.aio.server(
        interceptors=[
            interceptors.CallInterceptor(
                _NoUsers(), trusted_proxies="", domain_of=status.method_domain, slow_call_seconds=10,
                join_token=TOKEN,  # as the control plane runs it: callers bring the token, not a certificate
            )
        ]
    )  # fmt: skip
    add_ads_to_server(plane.cache, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            ads = channel.stream_stream(
                f"/{XDS_SERVICE}/StreamAggregatedResources",
                request_serializer=bytes,
                response_deserializer=DiscoveryResponse.parse,
            )
            request = DiscoveryRequest(type_url=SECRETS, resource_names=[envoy_config.WORKLOAD_SECRET])
            for metadata in ((), ((identity.JOIN_TOKEN_HEADER, "wrong"),)):
                call = ads(iter([request]), metadata=metadata)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await asyncio.wait_for(call.read(), 10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value.details()
            call = ads(metadata=((identity.JOIN_TOKEN_HEADER, TOKEN),))
            await call.write(request)
            response = await asyncio.wait_for(call.read(), 10)
            assert isinstance(response, DiscoveryResponse) and len(response.resources) == 1
            # Envoy acknowledges and names one more secret (a listener warming): it gets both, at the same version.
            names = [envoy_config.WORKLOAD_SECRET, envoy_config.EDGE_SECRET]
            await call.write(dataclasses.replace(request, resource_names=names, version_info=response.version_info,
                                                 response_nonce=response.nonce))  # fmt: skip
            grown = await asyncio.wait_for(call.read(), 10)
            assert isinstance(grown, DiscoveryResponse) and len(grown.resources) == 2
            assert grown.version_info == response.version_info
            call.cancel()
    finally:
        await server.stop(None)
