"""The contracts list the error reasons each service returns, and the list is true to the code.

Each service's comment in its proto ends with the reasons its RPCs can return, one per line:

    // Error reasons (google.rpc.ErrorInfo.reason; domain "<name>.voiceassist"):
    // - VALIDATION_ERROR: a request field is malformed; google.rpc.BadRequest names it.

The lists are read from the descriptor set Envoy transcodes with (gen/voiceassist.binpb: buf keeps the comments
in its source info, and `make check-gen` keeps it in step with proto/). Every listed reason must be a member of
`services.core.errors.Reason`, listed once and in the enum's order; the domain is the service's error domain.

What a service's code can return is found by reading its source, not by running it:
- every `Reason.X` in the modules of its package (`services/<name>/`, the package the registry names for the
  proto service), VALIDATION_ERROR for each call of `invalid(...)` and NOT_FOUND for each call of `not_found(...)`;
- the reasons raised in the body of each `services.core` function the package imports by name and calls
  (`require_role` raises PERMISSION_DENIED, `decode_page_token` INVALID_PAGE_TOKEN, ...), one call deep;
- the reasons of the stack every call passes through: the interceptor (`services/core/interceptors.py`) and, for
  services with methods that need an access token, its authentication step and the token verifier
  (`services/core/tokens.py`); its join-token check for the control plane's services, and its peer check for
  services with internal methods (registry.INTERNAL_METHODS).
The scan over-approximates (a reason only named in an audit record counts) and cannot see a reason relayed from
another service's reply (voice relays rag's); a proto may list such reasons too, as long as `Reason` has them.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from services.core import registry
from services.core.errors import Reason
from services.core.settings import ROOT
from services.core.status import service_domain

SERVICES = ROOT / "services"
SPECS = {spec.grpc_service: spec for spec in (*registry.SERVICES, registry.CONTROL_PLANE)}
# The control plane's certificate authority: a service of the control plane package, in modules of its own.
CERTIFICATE_AUTHORITY = "voiceassist.control.v1.CertificateAuthorityService"
SPECS[CERTIFICATE_AUTHORITY] = registry.CONTROL_PLANE
MODULES = {CERTIFICATE_AUTHORITY: [SERVICES / "control_plane" / n for n in ("certificates.py", "authority.py")]}
CORE = SERVICES / "core"
# The control plane renders Envoy's configuration, whose own replies (body too large, no route, upstream down) carry
# reasons of the edge's domain ("envoy.voiceassist"), not of the control plane's RPCs.
EDGE_MODULES = {SERVICES / "control_plane" / "envoy_config.py"}
# A reason-raising helper's call stands for the reason it raises.
HELPERS = {"invalid": Reason.VALIDATION_ERROR, "not_found": Reason.NOT_FOUND}
HEADING = re.compile(r"^Error reasons \(google\.rpc\.ErrorInfo\.reason; domain \"(?P<domain>[a-z_.]+)\"\):$")
ITEM = re.compile(r"^- (?P<reason>[A-Z][A-Z0-9_]*): \S")


@functools.cache
def _services() -> dict[str, tuple[str, list[str]]]:
    """Proto service full name -> its leading comment and its method paths, from the descriptor set."""
    data = (ROOT / "gen" / "voiceassist.binpb").read_bytes()
    found = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        if not file.package.startswith("voiceassist."):
            continue
        by_path = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
        for i, service in enumerate(file.service):
            name = f"{file.package}.{service.name}"
            comment = by_path.get((6, i), "")  # 6: FileDescriptorProto.service
            found[name] = (comment, [f"/{name}/{method.name}" for method in service.method])
    return found


def documented(comment: str) -> tuple[str, list[str]]:
    """The domain and the reasons of a service comment's error list; AssertionError when it has none."""
    lines = [line.strip() for line in comment.splitlines()]
    starts = [i for i, line in enumerate(lines) if HEADING.match(line)]
    assert len(starts) == 1, "the service comment needs one 'Error reasons (...):' list"
    items = []
    for line in lines[starts[0] + 1 :]:
        if not line:
            break
        if line.startswith("- "):
            found = ITEM.match(line)
            assert found, f"not a '- REASON: meaning' line: {line!r}"
            items.append(found["reason"])
    assert items, "the error list is empty"
    return HEADING.match(lines[starts[0]])["domain"], items


def _uses(node: ast.AST) -> set[Reason]:
    """The reasons a piece of code names: `Reason.X`, and the calls of the HELPERS."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "Reason":
            if sub.attr in Reason.__members__:  # not `Reason.__members__` itself
                found.add(Reason[sub.attr])
        elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in HELPERS:
            found.add(HELPERS[sub.func.id])
    return found


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@functools.cache
def _core_functions() -> dict[tuple[str, str], set[Reason]]:
    """(module, function) -> the reasons raised in its body, for every top-level function of services.core."""
    return {
        (f"services.core.{path.stem}", node.name): _uses(node)
        for path in CORE.glob("*.py")
        for node in _tree(path).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def _module_reasons(path: Path) -> set[Reason]:
    """The reasons a module names, and those raised by the services.core functions it imports by name and calls."""
    tree = _tree(path)
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    found = _uses(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("services.core"):
            for alias in node.names:
                if (alias.asname or alias.name) in called:
                    found |= _core_functions().get((node.module, alias.name), set())
    return found


@functools.cache
def _interceptor() -> dict[str, set[Reason]]:
    """The interceptor's reasons by step: every call, authentication (with the token verifier's), the join token
    check and the peer check."""
    path = CORE / "interceptors.py"
    call = next(n for n in _tree(path).body if isinstance(n, ast.ClassDef) and n.name == "_Call")

    def step(name: str) -> set[Reason]:
        return _uses(next(n for n in call.body if getattr(n, "name", "") == name))

    join, peer = step("_check_join_token"), step("_check_peer")
    authentication = step("_authenticate") | _module_reasons(CORE / "tokens.py")
    every_call = _module_reasons(path) - step("_authenticate") - join - peer
    return {"every call": every_call, "authentication": authentication, "join": join, "peer": peer}


def raised(grpc_service: str) -> set[Reason]:
    """Every reason the code behind `grpc_service` can return, by the static scan the module docstring explains."""
    package = SERVICES / SPECS[grpc_service].name
    steps = _interceptor()
    modules = MODULES.get(grpc_service) or [path for path in package.rglob("*.py") if path not in EDGE_MODULES]
    found = steps["every call"].union(*(_module_reasons(path) for path in modules))
    _, methods = _services()[grpc_service]
    if not all(registry.is_public_method(m) for m in methods):
        found |= steps["authentication"]
    if any(m.startswith(registry.CONTROL_PLANE_PREFIXES) for m in methods):
        found |= steps["join"]
    if any(m in registry.INTERNAL_METHODS for m in methods):
        found |= steps["peer"]
    return found


SERVICE_NAMES = sorted(_services())


def test_every_service_of_the_registry_has_a_contract() -> None:
    assert set(SERVICE_NAMES) == set(SPECS)


@pytest.mark.parametrize("grpc_service", SERVICE_NAMES)
def test_documented_reasons_are_reasons_in_the_errors_domain(grpc_service: str) -> None:
    domain, reasons = documented(_services()[grpc_service][0])
    assert domain == service_domain(SPECS[grpc_service].name)
    assert [r for r in reasons if r not in Reason.__members__] == []
    order = list(Reason.__members__)
    assert reasons == sorted(set(reasons), key=order.index), "list each reason once, in the order of Reason"


@pytest.mark.parametrize("grpc_service", SERVICE_NAMES)
def test_every_reason_the_code_returns_is_documented(grpc_service: str) -> None:
    _, reasons = documented(_services()[grpc_service][0])
    assert sorted(raised(grpc_service) - set(map(Reason, reasons))) == []


def test_a_reason_missing_from_a_contract_is_caught() -> None:
    auth = "voiceassist.auth.v1.AuthService"
    comment = "\n".join(line for line in _services()[auth][0].splitlines() if "- ACCOUNT_DISABLED:" not in line)
    _, reasons = documented(comment)
    assert raised(auth) - set(map(Reason, reasons)) == {Reason.ACCOUNT_DISABLED}
