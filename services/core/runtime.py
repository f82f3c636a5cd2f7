"""What a hosted service gets from the process: settings, channels to other services, the shared stores
(Redis or in-process), the token verifier and audit clients. One Runtime per process, shared by every service
the process hosts, so embedded mode shares one revocation list and one audit queue.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from typing import Any

from google.protobuf.json_format import MessageToDict

from services.core import registry
from services.core.audit_client import AuditClient, AuditSink, QueueSink, RedisStreamSink
from services.core.audit_rpc_sink import RpcSink
from services.core.certificates import WorkloadCertificates
from services.core.clients import ChannelPool
from services.core.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from services.core.redis_store import RedisConnection
from services.core.revocation import MemoryRevocationList, RedisRevocationList, RevocationList
from services.core.settings import CoreSettings
from services.core.tokens import JwtVerifier, KeySet
from voiceassist.audit.v1 import audit_pb2, audit_pb2_grpc
from voiceassist.auth.v1 import auth_pb2, auth_pb2_grpc


class Runtime:
    """Process-wide wiring, chosen from settings; never business logic."""

    def __init__(
        self, settings: CoreSettings, hosted: Iterable[str], self_address: str, audit_sink: AuditSink | None = None,
        certificates: WorkloadCertificates | None = None,
    ) -> None:  # fmt: skip
        """`audit_sink` replaces the one settings choose (a command that must know its events are committed);
        `certificates` (MESH_TLS) are this process's, for mutual TLS with the services it calls."""
        self.settings = settings
        self.hosted = frozenset(hosted)
        self.self_address = self_address
        self.certificates = certificates
        self.channels = ChannelPool(self.address, certificates)
        self.redis: RedisConnection | None = None
        self.revocations: RevocationList
        self.rate_limiter: RateLimiter
        if settings.redis_url:
            self.redis = RedisConnection(settings.redis_url, settings.redis_key_prefix, settings.redis_timeout_seconds)
            self.revocations = RedisRevocationList(self.redis)
            self.rate_limiter = RedisRateLimiter(self.redis)
        else:
            self.revocations = MemoryRevocationList()
            self.rate_limiter = MemoryRateLimiter()
        # Embedded mode: the audit service hosted here consumes this queue (services/audit/ingest.py).
        self.audit_queue: asyncio.Queue[audit_pb2.Event] | None = None
        self.audit_sink: AuditSink = audit_sink or self._audit_sink()
        self.token_verifier = JwtVerifier(
            KeySet(self._fetch_jwks),
            self.revocations,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway=settings.jwt_leeway_seconds,
            fail_closed=settings.auth_fail_closed,
            on_outage=self._audit_revocation_outage,
            cache_size=settings.token_cache_size,
        )

    @property
    def mutual_tls(self) -> bool:
        """Whether this process's server accepts only peers with a mesh certificate: every mesh server under
        MESH_TLS but the control plane, whose callers bring the join token instead (they ask it for their first
        certificate)."""
        return self.certificates is not None and registry.CONTROL_PLANE.name not in self.hosted

    def address(self, service: str) -> str:
        """Where to call `service`: this process when it hosts it, else its configured address."""
        return self.self_address if service in self.hosted else self.settings.address_of(service)

    def _audit_sink(self) -> AuditSink:
        limit = self.settings.audit_buffer_max_events
        if self.redis is not None:
            return RedisStreamSink(self.redis, limit)
        if "audit" in self.hosted:
            self.audit_queue = asyncio.Queue(limit)
            return QueueSink(self.audit_queue)
        stub = functools.partial(self.channels.stub, "audit", audit_pb2_grpc.AuditServiceStub)
        return RpcSink(stub, limit, forward_tokens=self.certificates is None)

    def audit(self, service: str) -> AuditClient:
        """An audit client that records events as `service`."""
        return AuditClient(service, self.audit_sink)

    async def _fetch_jwks(self) -> list[dict[str, Any]]:
        stub = self.channels.stub("auth", auth_pb2_grpc.AuthServiceStub)
        reply = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
        return [MessageToDict(k, preserving_proto_field_name=True) for k in reply.keys]

    async def _audit_revocation_outage(self) -> None:
        await self.audit("core").record(
            "auth.revocation.unavailable", success=False, failure_reason="BACKEND_UNAVAILABLE",
            metadata={"policy": "fail_open"},
        )  # fmt: skip

    async def close(self) -> None:
        """Hand over buffered audit events, then close channels and connections."""
        await self.audit_sink.close()
        await self.channels.close()
        if self.redis is not None:
            await self.redis.close()
