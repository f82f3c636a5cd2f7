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


def create_admin(cluster: Cluster, channel: grpc.Channel) -> Account:
    """A new admin in `cluster`'s auth database, signed in over `channel`."""
    email = unique_email("admin")
    env = {**os.environ, **cluster.env, "VOICEASSIST_ADMIN_PASSWORD": STRONG_PASSWORD}
    made = subprocess.run(
        [sys.executable, "-m", "services.cli", "users", "create-admin", email], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if made.returncode != 0:
        raise RuntimeError(f"create-admin failed: {made.stderr[-2000:]}")
    reply = auth_pb2_grpc.AuthServiceStub(channel).Login(
        auth_pb2.LoginRequest(email=email, password=STRONG_PASSWORD), timeout=30
    )
    return Account(email, reply.user.id, reply.access_token, reply.refresh_token)
