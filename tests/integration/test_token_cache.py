"""The verified-token cache of every service: it skips the signature check, never the revocation check, and stays
bounded. The revocation list is the real one on Redis; tokens are signed with a real Ed25519 key."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.core.errors import ServiceError
from services.core.redis_store import RedisConnection
from services.core.revocation import RedisRevocationList
from services.core.tokens import JwtVerifier, KeySet
from tests.support.mesh import TEST_REDIS_URL

pytestmark = pytest.mark.mesh

KEY = Ed25519PrivateKey.generate()
JWK = {**json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(KEY.public_key())), "kid": "k1", "alg": "EdDSA"}


def _token(user: str = "u1", lifetime: float = 900, **claims: object) -> str:
    now = time.time()
    body = {
        "sub": user, "iss": "iss", "aud": "aud", "typ": "access", "role": "user", "jti": uuid.uuid4().hex,
        "fam": uuid.uuid4().hex, "iat": int(now) - 1, "exp": int(now + lifetime), **claims,
    }  # fmt: skip
    return jwt.encode(body, KEY, algorithm="EdDSA", headers={"kid": "k1"})


@pytest.fixture
async def redis_connection():
    connection = RedisConnection(TEST_REDIS_URL, f"test:{uuid.uuid4().hex[:8]}:", 2.0)
    yield connection
    keys = [k async for k in connection.client.scan_iter(match=f"{connection.prefix}*")]
    if keys:
        await connection.client.delete(*keys)
    await connection.close()


def _verifier(revocations: RedisRevocationList, cache_size: int = 100, leeway: int = 0) -> JwtVerifier:
    async def jwks() -> list[dict]:
        return [JWK]

    return JwtVerifier(
        KeySet(jwks), revocations, issuer="iss", audience="aud", leeway=leeway, fail_closed=True, cache_size=cache_size
    )


async def _reason(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(ServiceError) as caught:
        await verifier.verify(token)
    return caught.value.reason.value


async def test_a_cached_token_is_refused_on_the_next_call_once_revoked(redis_connection: RedisConnection) -> None:
    revocations = RedisRevocationList(redis_connection)
    verifier = _verifier(revocations)
    token = _token()
    caller = await verifier.verify(token)
    assert len(verifier.verified) == 1  # it sits in the cache now
    assert await verifier.verify(token) == caller
    await revocations.revoke_token(caller.token_id, 60)
    assert await _reason(verifier, token) == "TOKEN_REVOKED"


async def test_a_cached_token_of_a_deactivated_user_is_refused(redis_connection: RedisConnection) -> None:
    # Deactivation, a password change and revoke-all set a per-user cut-off: every token issued before it is dead.
    revocations = RedisRevocationList(redis_connection)
    verifier = _verifier(revocations)
    token, other = _token("alice"), _token("bob")
    await verifier.verify(token)
    await verifier.verify(other)
    await revocations.revoke_user_before("alice", time.time(), 60)
    assert await _reason(verifier, token) == "TOKEN_REVOKED"
    assert (await verifier.verify(other)).user_id == "bob"
    # A whole login session (refresh family) too.
    session = _token("carol")
    family = (await verifier.verify(session)).family_id
    await revocations.revoke_family(family, 60)
    assert await _reason(verifier, session) == "TOKEN_REVOKED"


async def test_the_cache_stays_bounded_and_forgets_expired_tokens(redis_connection: RedisConnection) -> None:
    verifier = _verifier(RedisRevocationList(redis_connection), cache_size=3)
    tokens = [_token(f"user{i}") for i in range(10)]
    for token in tokens:
        await verifier.verify(token)
        assert len(verifier.verified) <= 3
    assert (await verifier.verify(tokens[0])).user_id == "user0"  # evicted, so checked again in full
    short = _token(lifetime=1)
    await verifier.verify(short)
    await asyncio.sleep(2.1)  # whole seconds: exp is an integer
    assert await _reason(verifier, short) == "TOKEN_EXPIRED"


async def test_a_forged_token_is_never_cached(redis_connection: RedisConnection) -> None:
    verifier = _verifier(RedisRevocationList(redis_connection))
    token = _token()
    head, body, signature = token.split(".")
    forged = f"{head}.{body}.{signature[:-4]}AAAA"
    assert await _reason(verifier, forged) == "TOKEN_INVALID"
    assert await _reason(verifier, forged) == "TOKEN_INVALID"
    assert len(verifier.verified) == 0
