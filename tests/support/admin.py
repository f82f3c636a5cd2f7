"""Admin accounts for tests and benchmarks, made the way an operator makes them: `voiceassist users create-admin`."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc

from services.core.settings import ROOT
from tests.support.clients import STRONG_PASSWORD, Account, unique_email
from tests.support.mesh import Cluster
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc


def users_cli(cluster: Cluster, *args: str, password: str = STRONG_PASSWORD) -> subprocess.CompletedProcess[str]:
    """`voiceassist users ARGS` with `cluster`'s settings (and `password` for any password prompt), once it ended."""
    env = {**os.environ, **cluster.env, "VOICEASSIST_ADMIN_PASSWORD": password}
    return subprocess.run([sys.executable, "-m", "services.cli", "users", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def create_admin(cluster: Cluster, channel: grpc.Channel) -> Account:
    """A new admin in `cluster`'s auth database, signed in over `channel`."""
    email = unique_email("admin")
    made = users_cli(cluster, "create-admin", email)
    if made.returncode != 0:
        raise RuntimeError(f"create-admin failed: {made.stderr[-2000:]}")
    reply = auth_pb2_grpc.AuthServiceStub(channel).Login(
        auth_pb2.LoginRequest(email=email, password=STRONG_PASSWORD), timeout=30
    )
    return Account(email, reply.user.id, reply.access_token, reply.refresh_token)
