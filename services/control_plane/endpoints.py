"""The live endpoints: workers that announced themselves, in the state they last reported.

Envoy is told about SERVING endpoints only. An endpoint lives as long as its announcement stream: a worker that
stops, dies or becomes unreachable closes it, and its endpoint leaves at once.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from services.core import registry
from services.core.errors import Reason, ServiceError, invalid

log = logging.getLogger(__name__)

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
WITHDRAWN = "WITHDRAWN"
STATES = (SERVING, NOT_SERVING, WITHDRAWN)


@dataclass(frozen=True)
class Endpoint:
    """One worker process."""

    service: str
    host: str
    port: int
    instance: str

    @property
    def address(self) -> tuple[str, int]:
        """(host, port)."""
        return self.host, self.port

    @classmethod
    def checked(cls, service: str, host: str, port: int, instance: str) -> Endpoint:
        """An endpoint Envoy can use; ServiceError names what is wrong (Envoy takes IP addresses only, and one
        bad endpoint would make it reject every service's endpoints)."""
        if service not in registry.BY_NAME:
            raise ServiceError(Reason.NOT_FOUND, f"unknown service {service!r}; known: {', '.join(registry.BY_NAME)}")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise invalid("endpoint.host", "must be an IP address (Envoy does not resolve endpoint names)") from None
        if ip.is_unspecified or ip.is_multicast:
            raise invalid("endpoint.host", "must be an address other hosts can reach, not 0.0.0.0 or multicast")
        if not 0 < port < 65536:
            raise invalid("endpoint.port", "must be 1-65535")
        return cls(service, str(ip), port, instance[:200])


class EndpointTable:
    """Announcements by stream; `on_change` is called after every change (it publishes a new snapshot)."""

    def __init__(self, on_change: Callable[[], int]) -> None:
        self._entries: dict[object, tuple[Endpoint, str]] = {}
        self._on_change = on_change

    def put(self, key: object, endpoint: Endpoint, state: str) -> int:
        """Record an announcement's state; the generation of the snapshot that reflects it."""
        previous = self._entries.get(key)
        self._entries[key] = (endpoint, state)
        if previous is None or previous[1] != state:
            log.info("endpoint %s", state.lower(), extra={"service": endpoint.service,
                     "endpoint": f"{endpoint.host}:{endpoint.port}", "instance": endpoint.instance})  # fmt: skip
        return self._on_change()

    def remove(self, key: object) -> None:
        """Forget an announcement whose stream ended."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            endpoint, _ = entry
            log.info("endpoint gone", extra={"service": endpoint.service,
                     "endpoint": f"{endpoint.host}:{endpoint.port}", "instance": endpoint.instance})  # fmt: skip
            self._on_change()

    def serving(self, service: str) -> list[tuple[str, int]]:
        """The addresses of a service's SERVING endpoints, sorted (a restarted worker that announced before its
        predecessor's stream closed counts once)."""
        return sorted({e.address for e, state in self._entries.values() if e.service == service and state == SERVING})
