"""How the command-line clients sign in (services/core/cli_login.py): `voiceassist audit|kb|voice` run as processes
against the embedded system through Envoy. The ledger's auth events show when a command logged in or refreshed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from services.core.settings import ROOT
from tests.support.clients import STRONG_PASSWORD, register_and_login, unique_email
from tests.support.mesh import Cluster
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc

CREDENTIALS = ("VOICEASSIST_TOKEN", "VOICEASSIST_EMAIL", "VOICEASSIST_PASSWORD", "VOICEASSIST_ADDRESS")


def voiceassist(embedded: Cluster, cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`voiceassist ARGS` through Envoy with `env` as its only credentials and `cache` as its token cache."""
    assert embedded.envoy is not None
    inherited = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        env={**inherited, **embedded.env, "VOICEASSIST_ADDRESS": embedded.envoy.address,
             "VOICEASSIST_TOKEN_CACHE": str(cache), **env},
    )  # fmt: skip


def auth_events(result: subprocess.CompletedProcess) -> list[str]:
    """The actions `audit export` printed."""
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["action"] for line in result.stdout.splitlines()]


def test_without_credentials_the_command_says_how_to_sign_in_and_a_wrong_password_fails(
    embedded: Cluster, tmp_path: Path
) -> None:
    cache = tmp_path / "tokens.json"
    bare = voiceassist(embedded, cache, "kb", "search", "asthma")
    assert bare.returncode == 2 and "--email" in bare.stderr and "VOICEASSIST_TOKEN" in bare.stderr
    wrong = voiceassist(embedded, cache, "kb", "search", "asthma", "--email", unique_email(), VOICEASSIST_PASSWORD="x")
    assert wrong.returncode == 1 and "login failed: UNAUTHENTICATED" in wrong.stderr
    assert not cache.exists()


def test_a_given_token_is_used_as_is_from_the_flag_or_the_environment(embedded: Cluster, tmp_path: Path) -> None:
    assert embedded.envoy is not None
    with grpc.insecure_channel(embedded.envoy.address) as channel:
        account = register_and_login(channel)
    cache = tmp_path / "tokens.json"
    flag = voiceassist(embedded, cache, "kb", "search", "asthma", "--token", account.access_token)
    env = voiceassist(embedded, cache, "kb", "search", "asthma", VOICEASSIST_TOKEN=account.access_token)
    assert flag.returncode == 0 and env.returncode == 0, flag.stderr + env.stderr
    assert not cache.exists()  # a token given is the caller's to keep
    forged = voiceassist(embedded, cache, "kb", "search", "asthma", VOICEASSIST_TOKEN="not-a-token")
    assert forged.returncode == 1 and "UNAUTHENTICATED" in forged.stderr


def test_one_login_serves_every_client_until_its_token_expires_then_a_refresh_does(
    embedded: Cluster, tmp_path: Path
) -> None:
    assert embedded.envoy is not None
    email = unique_email("cli")
    with grpc.insecure_channel(embedded.envoy.address) as channel:
        auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(email=email, password=STRONG_PASSWORD), timeout=30
        )
    cache = tmp_path / "cache" / "tokens.json"
    export = ("audit", "export", "--action-prefix", "auth.")

    signed_in = voiceassist(embedded, cache, *export, "--email", email, VOICEASSIST_PASSWORD=STRONG_PASSWORD)
    auth_events(signed_in)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600 and stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    entry = json.loads(cache.read_text())[embedded.envoy.address]
    assert entry["email"] == email and entry["access_expires_at"] > time.time() + 600

    # No credentials at all now: each client signs in from the cache, neither logging in nor refreshing.
    written = cache.read_bytes()
    for command in (export, ("kb", "search", "asthma"), ("voice", "voices", "--language", "en")):
        reused = voiceassist(embedded, cache, *command)
        assert reused.returncode == 0, f"{command}: {reused.stderr}"
    assert cache.read_bytes() == written

    # The access token ran out (as far as the client knows): the next command refreshes the pair.
    json.dump({embedded.envoy.address: {**entry, "access_expires_at": time.time() - 1}}, cache.open("w"))
    refreshed = voiceassist(embedded, cache, "kb", "search", "asthma")
    assert refreshed.returncode == 0, refreshed.stderr
    renewed = json.loads(cache.read_text())[embedded.envoy.address]
    assert renewed["access_token"] != entry["access_token"] and renewed["refresh_token"] != entry["refresh_token"]
    assert renewed["access_expires_at"] > time.time() + 600

    # The ledger agrees: one login for all of the above, then one refresh (events arrive in order, eventually).
    deadline = time.monotonic() + 30
    while "auth.refresh" not in (actions := auth_events(voiceassist(embedded, cache, *export))):
        if time.monotonic() > deadline:
            pytest.fail(f"no auth.refresh event in the ledger: {actions}")
        time.sleep(0.5)
    assert actions.count("auth.login.success") == 1 and actions.count("auth.refresh") == 1, actions


def test_a_refresh_token_that_no_longer_works_means_a_new_login(embedded: Cluster, tmp_path: Path) -> None:
    assert embedded.envoy is not None
    with grpc.insecure_channel(embedded.envoy.address) as channel:
        account = register_and_login(channel)
    cache = tmp_path / "tokens.json"
    stale = {"email": account.email, "access_token": account.access_token, "access_expires_at": 0,
             "refresh_token": "revoked", "refresh_expires_at": time.time() + 3600}  # fmt: skip
    cache.write_text(json.dumps({embedded.envoy.address: stale}))
    prompted = voiceassist(embedded, cache, "kb", "search", "asthma")
    # The refresh is refused, so it signs in again as the cached account: here, with no terminal, the prompt fails.
    assert prompted.returncode == 1 and f"password for {account.email}" in prompted.stderr
    again = voiceassist(embedded, cache, "kb", "search", "asthma", VOICEASSIST_PASSWORD=STRONG_PASSWORD)
    assert again.returncode == 0, again.stderr
    assert json.loads(cache.read_text())[embedded.envoy.address]["access_token"] != account.access_token
