"""A client of any OpenAI-compatible chat-completions endpoint (OpenAI, Ollama, llama.cpp server, vLLM).

Streams tokens over server-sent events. A call that fails before its first token (connection refused, timeout, 429,
5xx) is retried with exponential backoff (tenacity); after that nothing is retried, since tokens already went to the
caller. Consecutive failures open a circuit breaker, so a dead endpoint costs callers nothing until it recovers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from circuitbreaker import CircuitBreaker
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

_RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ModelUnavailable(Exception):
    """The model could not start an answer: breaker open, endpoint down, or it kept refusing. Nothing was sent
    to the caller yet, so another model can take over."""


class ModelStreamBroken(Exception):
    """The model failed after some tokens were delivered."""


class _RetryableStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@dataclass(frozen=True)
class ChatEndpoint:
    """Where and how to call one model."""

    base_url: str
    model: str
    api_key: str = ""
    connect_timeout: float = 3.0
    read_timeout: float = 60.0
    retries: int = 2
    max_tokens: int = 800
    temperature: float = 0.1
    breaker_failures: int = 5
    breaker_recovery_seconds: float = 30.0


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | _RetryableStatus)


class ChatClient:
    """Chat completions against one endpoint, streamed."""

    def __init__(self, name: str, endpoint: ChatEndpoint, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.name = name
        self.endpoint = endpoint
        headers = {"authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        timeout = httpx.Timeout(endpoint.read_timeout, connect=endpoint.connect_timeout)
        self._http = httpx.AsyncClient(
            base_url=endpoint.base_url.rstrip("/") + "/", headers=headers, timeout=timeout, transport=transport
        )
        self._breaker = CircuitBreaker(
            failure_threshold=endpoint.breaker_failures,
            recovery_timeout=endpoint.breaker_recovery_seconds,
            expected_exception=(ModelUnavailable, ModelStreamBroken),
            name=f"model-{name}",
        )

    @property
    def model_label(self) -> str:
        """What answers record as `model_used`, e.g. "local:llama3.1:8b"."""
        return f"{self.name}:{self.endpoint.model}"

    @property
    def available(self) -> bool:
        """False while the breaker is open."""
        return not self._breaker.opened

    async def stream(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        """The answer's text deltas. ModelUnavailable before the first delta, ModelStreamBroken after it."""
        if self._breaker.opened:
            raise ModelUnavailable(f"{self.name} model circuit open")
        body = {
            "model": self.endpoint.model,
            "messages": messages,
            "stream": True,
            "max_tokens": self.endpoint.max_tokens,
            "temperature": self.endpoint.temperature,
        }
        with self._breaker:
            response = await self._open(body)
            try:
                async for delta in _sse_deltas(response):
                    yield delta
            except (httpx.HTTPError, ValueError) as exc:
                raise ModelStreamBroken(f"{self.name} model stream broke: {type(exc).__name__}") from None
            finally:
                await response.aclose()

    async def _open(self, body: dict[str, Any]) -> httpx.Response:
        """POST and wait for a 200 response head, retrying what is worth retrying."""
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.endpoint.retries + 1),
                wait=wait_exponential(multiplier=0.2, max=2.0),
                retry=retry_if_exception(_retryable),
                reraise=True,
            ):
                with attempt:
                    request = self._http.build_request("POST", "chat/completions", json=body)
                    response = await self._http.send(request, stream=True)
                    if response.status_code == 200:
                        return response
                    await response.aclose()
                    if response.status_code in _RETRYABLE_STATUS:
                        raise _RetryableStatus(response.status_code)
                    raise ModelUnavailable(f"{self.name} model refused the request: HTTP {response.status_code}")
        except (httpx.HTTPError, _RetryableStatus) as exc:
            raise ModelUnavailable(f"{self.name} model unreachable: {type(exc).__name__} {exc}") from None
        raise ModelUnavailable(f"{self.name} model gave no answer")  # pragma: no cover - AsyncRetrying reraises

    async def close(self) -> None:
        """Close pooled connections."""
        await self._http.aclose()


async def _sse_deltas(response: httpx.Response) -> AsyncIterator[str]:
    """Text deltas from an OpenAI-style event stream; also accepts a plain JSON reply (servers that ignore
    `stream`)."""
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        reply = json.loads(await response.aread())
        content = reply["choices"][0]["message"].get("content") or ""
        if content:
            yield content
        return
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # comments, event names, keep-alives
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise ValueError("model reported an error mid-stream")
        for choice in event.get("choices", []):
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                yield delta
