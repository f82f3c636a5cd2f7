"""`voiceassist users` changes are in the audit ledger when the command returns, in every mode (issue 12, defect 7):
the command used to hand its events to a buffer that died with it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.support.admin import create_admin, users_cli
from tests.support.clients import STRONG_PASSWORD, Account, register_and_login, unique_email
from tests.support.mesh import Cluster
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc


def _ledger(channel: grpc.Channel, admin: Account, action: str, resource_id: str) -> list[audit_pb2.Event]:
    """The committed events `action` on user `resource_id`, read back once (no polling: they must be there)."""
    request = audit_pb2.ListEventsRequest(
        filter=audit_pb2.EventFilter(action_prefix=action, resource_type="user", resource_id=resource_id)
    )
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    return list(stub.ListEvents(request, metadata=admin.metadata, timeout=10).events)


def _promote_is_in_the_ledger(cluster: Cluster, auth: grpc.Channel, audit: grpc.Channel, admin: Account) -> None:
    user = register_and_login(auth)
    promoted = users_cli(cluster, "promote", user.email)
    assert promoted.returncode == 0, promoted.stderr
    [event] = _ledger(audit, admin, "auth.user.promote_admin", user.user_id)
    assert event.actor.id == "cli" and event.outcome == audit_pb2.OUTCOME_SUCCESS
    assert event.metadata["previous_role"] == "user"


def test_users_changes_are_in_the_embedded_ledger_whether_or_not_the_server_runs(workdir: Path) -> None:
    cluster = Cluster.create(workdir, mesh=False)
    email = unique_email("first.admin")
    try:
        # The first admin of a new system: nothing runs yet.
        made = users_cli(cluster, "create-admin", email)
        assert made.returncode == 0, made.stderr
        server = cluster.start("all")
        with grpc.insecure_channel(server.address) as channel:
            signed_in = auth_pb2_grpc.AuthServiceStub(channel).Login(
                auth_pb2.LoginRequest(email=email, password=STRONG_PASSWORD), timeout=30
            )
            first = Account(email, signed_in.user.id, signed_in.access_token, signed_in.refresh_token)
            [created] = _ledger(channel, first, "auth.user.create_admin", first.user_id)
            assert created.actor.id == "cli" and created.service == "auth"

            # The server running: the command is another process writing to the same ledger.
            second = create_admin(cluster, channel)
            assert len(_ledger(channel, first, "auth.user.create_admin", second.user_id)) == 1
            _promote_is_in_the_ledger(cluster, channel, channel, first)
    finally:
        cluster.stop()


def test_users_command_fails_before_changing_anything_when_the_ledger_is_unreachable(workdir: Path) -> None:
    cluster = Cluster.create(workdir, mesh=False)
    ledger = Path(cluster.env["DATA_DIR"]) / "audit.db"
    ledger.mkdir(parents=True)  # a database SQLite cannot open
    email = unique_email("unaudited")
    refused = users_cli(cluster, "create-admin", email)
    assert refused.returncode != 0 and "BACKEND_UNAVAILABLE" in refused.stderr and "audit ledger" in refused.stderr

    ledger.rmdir()
    made = users_cli(cluster, "create-admin", email)  # not EMAIL_TAKEN: the refused command created nothing
    assert made.returncode == 0, made.stderr


@pytest.mark.mesh
def test_users_changes_are_in_the_mesh_ledger_when_the_command_returns(mesh: Cluster) -> None:
    auth = next(s for s in mesh.servers if s.services == "auth")
    audit = next(s for s in mesh.servers if s.services == "audit")
    with grpc.insecure_channel(auth.address) as auth_channel, grpc.insecure_channel(audit.address) as channel:
        admin = create_admin(mesh, auth_channel)
        [created] = _ledger(channel, admin, "auth.user.create_admin", admin.user_id)
        assert created.actor.id == "cli"
        _promote_is_in_the_ledger(mesh, auth_channel, channel, admin)
