"""IssueCertificate: the control plane's certificate authority, for processes holding the mesh's join token (the
server interceptor checks it on every call to the control plane)."""

from __future__ import annotations

import datetime
import logging

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.timestamp_pb2 import Timestamp

from services.control_plane.authority import Authority
from services.core import identity, registry
from services.core.errors import invalid
from voiceassist.control.v1 import certificates_pb2, certificates_pb2_grpc

log = logging.getLogger(__name__)

# What a process may be: a service of the registry, or an operator's tool (which passes mutual TLS and is granted
# nothing by it: internal methods need a service). Envoy's certificates and the control plane's own are issued here
# directly, never on request.
ISSUABLE = registry.SERVICE_NAMES | {identity.OPERATOR}


class CertificateAuthorityServicer(certificates_pb2_grpc.CertificateAuthorityServiceServicer):
    """Signs the signing requests of processes that present the join token."""

    def __init__(self, authority: Authority) -> None:
        self._authority = authority

    async def IssueCertificate(
        self,
        request: certificates_pb2.IssueCertificateRequest,
        context: grpc.aio.ServicerContext[
            certificates_pb2.IssueCertificateRequest, certificates_pb2.IssueCertificateResponse
        ],
    ) -> certificates_pb2.IssueCertificateResponse:
        if not request.signing_request_pem:
            raise invalid("signing_request_pem", "required")
        try:
            csr = x509.load_pem_x509_csr(request.signing_request_pem.encode())
        except ValueError:
            raise invalid("signing_request_pem", "not a PEM PKCS#10 certificate signing request") from None
        workloads = identity.workloads_in(csr)
        if not workloads:
            raise invalid("signing_request_pem", "names no workload (a spiffe://voiceassist/<service> URI SAN)")
        refused = sorted(set(workloads) - ISSUABLE)
        if refused:
            raise invalid("signing_request_pem", f"names workloads no process may be: {', '.join(refused)}")
        try:
            leaf = self._authority.sign(csr, workloads)
        except ValueError as exc:
            raise invalid("signing_request_pem", str(exc)) from None
        expires = leaf.not_valid_after_utc
        log.info("certificate issued", extra={"workloads": workloads, "expires_at": expires.isoformat(),
                                              "peer": context.peer()})  # fmt: skip
        return certificates_pb2.IssueCertificateResponse(
            certificate_chain_pem=leaf.public_bytes(serialization.Encoding.PEM).decode(),
            trust_bundle_pem=self._authority.trust_pem.decode(),
            expires_at=_timestamp(expires),
        )


def _timestamp(moment: datetime.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp
