"""Authentication of incoming calls: every method outside `registry.PUBLIC_METHODS` needs a valid access token.

The interceptor reads `authorization: Bearer <jwt>`, has the runtime's token verifier check it, and records the
caller (id, role) in the request context for handlers (`context.current_caller()` / `require_role()`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from services.core import registry
from services.core.context import Caller, set_caller
from services.core.errors import Reason, ServiceError
from services.core.interceptors import AroundInterceptor, Invoke

if TYPE_CHECKING:
    from services.core.server import Runtime


class TokenVerifier(Protocol):
    """Checks an access token and returns the caller, or raises ServiceError (UNAUTHENTICATED)."""

    async def verify(self, token: str) -> Caller: ...


def bearer_token(context: grpc.aio.ServicerContext) -> str:
    """The token of an `authorization: Bearer ...` header, or ""."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


class AuthInterceptor(AroundInterceptor):
    """Verifies the access token of every non-public call before the handler runs."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def _authenticate(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if registry.is_public_method(method):
            return
        token = bearer_token(context)
        if not token:
            raise ServiceError(Reason.UNAUTHENTICATED, "missing access token (authorization: Bearer ...)")
        verifier: TokenVerifier | None = getattr(self._runtime, "token_verifier", None)
        if verifier is None:
            raise ServiceError(Reason.TOKEN_INVALID, "token verification is not configured on this server")
        set_caller(await verifier.verify(token), token)

    async def around_unary(self, method: str, context: grpc.aio.ServicerContext, invoke: Invoke) -> Any:
        await self._authenticate(method, context)
        return await invoke()

    async def around_stream(self, method: str, context: grpc.aio.ServicerContext, invoke: Invoke) -> AsyncIterator[Any]:
        await self._authenticate(method, context)
        async for item in invoke():
            yield item
