"""This process's workload certificate: obtained at start, renewed before it expires, handed to TLS.

A mesh process (MESH_TLS) asks the control plane's certificate authority for a certificate naming the services it
hosts (a fresh key every time; the key never leaves the process), and renews it at two thirds of its lifetime.
The gRPC server picks up a renewed certificate at the next handshake (gRPC's dynamic server credentials); client
channels are reopened with it (`ChannelPool`), and calls in flight finish on the old ones. Connections made with
the old certificate stay valid: TLS checks certificates at the handshake only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc

from services.core import identity
from services.core.settings import CoreSettings
from voiceassist.control.v1 import certificates_pb2, certificates_pb2_grpc

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3  # of the lifetime
RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)  # while the control plane cannot be reached
Obtain = Callable[[], Awaitable[identity.Credentials]]


class WorkloadCertificates:
    """The current credentials of this process, renewed in the background."""

    def __init__(self, obtain: Obtain, workloads: Sequence[str]) -> None:
        self._obtain = obtain
        self.workloads = tuple(workloads)
        self._current: identity.Credentials | None = None
        self._obtained_at = datetime.datetime.now(datetime.UTC)  # leaves are backdated: their lifetime counts from here
        self._generation = 0
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> identity.Credentials:
        """The credentials in force."""
        assert self._current is not None, "start() first"
        return self._current

    async def start(self, wait_seconds: float) -> None:
        """Obtain the first certificate (retrying for up to `wait_seconds` while the authority is unreachable),
        then keep renewing it."""
        self._install(await self._obtain_retrying(wait_seconds))
        self._task = asyncio.create_task(self._renew_forever())

    def on_renewal(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every renewal."""
        self._listeners.append(listener)

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        """Server credentials that present the current certificate at every new handshake and, with
        `require_client_auth`, accept only clients whose certificate chains to the mesh's roots."""
        served = self._generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            if served == self._generation:
                return None  # unchanged: gRPC keeps the configuration it has
            served = self._generation
            return self._configuration()

        # types-grpcio declares the fetcher without its documented None ("keep the current configuration").
        return grpc.dynamic_ssl_server_credentials(self._configuration(), fetch, require_client_auth)  # type: ignore[arg-type]

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials with the current certificate (a channel keeps them: reopen it after a renewal)."""
        c = self.current
        return grpc.ssl_channel_credentials(c.trust_pem, c.key_pem, c.chain_pem)

    async def close(self) -> None:
        """Stop renewing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        c = self.current
        return grpc.ssl_server_certificate_configuration([(c.key_pem, c.chain_pem)], root_certificates=c.trust_pem)

    def _install(self, credentials: identity.Credentials) -> None:
        self._current = credentials
        self._obtained_at = datetime.datetime.now(datetime.UTC)
        self._generation += 1
        log.info("workload certificate in force", extra={"workloads": list(self.workloads),
                 "expires_at": credentials.expires_at.isoformat()})  # fmt: skip
        for listener in self._listeners:
            listener()

    async def _obtain_retrying(self, wait_seconds: float) -> identity.Credentials:
        deadline = asyncio.get_running_loop().time() + wait_seconds
        for attempt in range(1_000_000):
            try:
                return await self._obtain()
            except grpc.aio.AioRpcError as exc:
                retryable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                left = deadline - asyncio.get_running_loop().time()
                if not retryable or left <= 0:
                    raise CertificateUnavailable(f"the certificate authority refused or is unreachable: "
                                                 f"{exc.code().name} {exc.details()}") from None  # fmt: skip
                await asyncio.sleep(min(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)], left))
        raise AssertionError("unreachable")

    async def _renew_forever(self) -> None:
        while True:
            c = self.current
            due = self._obtained_at + (c.expires_at - self._obtained_at) * RENEW_AT
            await asyncio.sleep(max(0.0, (due - datetime.datetime.now(datetime.UTC)).total_seconds()))
            try:
                # Until it expires, a renewal that fails is tried again on the way.
                expires_in = (c.expires_at - datetime.datetime.now(datetime.UTC)).total_seconds()
                self._install(await self._obtain_retrying(max(1.0, expires_in - 5)))
            except CertificateUnavailable as exc:
                log.error("workload certificate not renewed; new connections will fail once it expires",
                          extra={"error": str(exc)})  # fmt: skip
                await asyncio.sleep(RETRY_SECONDS[-1])


class CertificateUnavailable(RuntimeError):
    """No certificate could be obtained."""


def control_plane_channel(settings: CoreSettings, options: Sequence[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
    """A channel to the control plane: TLS verifying its certificate against the mesh's roots (MESH_TLS), else
    plaintext. Calls on it carry the join token (`join_token_metadata`)."""
    if not settings.mesh_tls:
        return grpc.aio.insecure_channel(settings.control_plane_addr, options=list(options))
    try:
        roots = settings.trust_bundle_path.read_bytes()
    except OSError as exc:
        raise CertificateUnavailable(
            f"cannot read the mesh's trust bundle {settings.trust_bundle_path} ({exc.strerror}): set "
            "MESH_TRUST_BUNDLE to the control plane's root.pem"
        ) from None
    return grpc.aio.secure_channel(
        settings.control_plane_addr,
        grpc.ssl_channel_credentials(roots),
        options=[*options, ("grpc.ssl_target_name_override", identity.CONTROL_PLANE)],
    )


def join_token_metadata(settings: CoreSettings) -> list[tuple[str, str]]:
    """The metadata that authenticates a call to the control plane."""
    return [(identity.JOIN_TOKEN_HEADER, settings.mesh_join_token.get_secret_value())]


async def issue(settings: CoreSettings, workloads: Sequence[str]) -> identity.Credentials:
    """A fresh key and a certificate for it naming `workloads`, from the control plane's authority."""
    key = identity.new_key()
    request = certificates_pb2.IssueCertificateRequest(
        signing_request_pem=identity.signing_request(key, workloads).decode()
    )
    async with control_plane_channel(settings) as channel:
        stub = certificates_pb2_grpc.CertificateAuthorityServiceStub(channel)
        reply = await stub.IssueCertificate(request, metadata=join_token_metadata(settings), timeout=10)
    return identity.Credentials(
        identity.key_pem(key), reply.certificate_chain_pem.encode(), reply.trust_bundle_pem.encode()
    )


def enrolled(settings: CoreSettings, workloads: Sequence[str]) -> WorkloadCertificates:
    """Certificates for `workloads` issued by the control plane's authority (CONTROL_PLANE_ADDR), renewed."""
    return WorkloadCertificates(functools.partial(issue, settings, workloads), workloads)


class OperatorCertificate:
    """A certificate for the `operator` workload (the launcher's probes, tests, tools that call servers directly): it
    passes mutual TLS and grants nothing a user's token does not (internal methods need a service). Issued on first
    use and again when it is about to expire; for synchronous callers."""

    RENEW_BEFORE = datetime.timedelta(minutes=10)

    def __init__(self, settings: CoreSettings) -> None:
        self._settings = settings
        self._held: identity.Credentials | None = None

    def __call__(self) -> identity.Credentials:
        """The current certificate; CertificateUnavailable or grpc.RpcError while the authority cannot issue one."""
        now = datetime.datetime.now(datetime.UTC)
        if self._held is None or self._held.expires_at - now < self.RENEW_BEFORE:
            self._held = asyncio.run(issue(self._settings, [identity.OPERATOR]))
        return self._held
