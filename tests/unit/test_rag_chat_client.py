"""The chat-completions client against a local server speaking the OpenAI protocol: streaming, retries before the
first token, no retry after it, and the circuit breaker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.rag.chat_client import ChatClient, ChatEndpoint, ModelStreamBroken, ModelUnavailable
from tests.support.fake_llm import Behaviour, FakeChatModel

MESSAGES = [{"role": "user", "content": "What lowers heart rate?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeChatModel]:
    model = FakeChatModel("local").start()
    yield model
    model.stop()


def _client(server: FakeChatModel, **overrides) -> ChatClient:
    settings = {"retries": 2, "breaker_failures": 3, "breaker_recovery_seconds": 60.0, "api_key": "k-123", **overrides}
    return ChatClient("local", ChatEndpoint(base_url=server.base_url, model="tiny", **settings))


async def test_streams_deltas_and_sends_model_key_and_messages(server: FakeChatModel) -> None:
    server.reset()
    client = _client(server)
    deltas = [d async for d in client.stream(MESSAGES)]
    await client.close()
    assert deltas == server.behaviour.pieces and len(deltas) > 1
    (request,) = server.requests
    assert request["model"] == "tiny" and request["stream"] is True and request["messages"] == MESSAGES
    assert request["auth"] == "Bearer k-123"
    assert client.model_label == "local:tiny"


async def test_failures_before_the_first_token_are_retried(server: FakeChatModel) -> None:
    server.reset(Behaviour(fail_first=2))
    client = _client(server)
    assert "".join([d async for d in client.stream(MESSAGES)]).endswith("[1].")
    await client.close()
    assert len(server.requests) == 3


async def test_a_stream_torn_after_tokens_is_not_retried(server: FakeChatModel) -> None:
    server.reset(Behaviour(break_after=2))
    client = _client(server)
    received = []
    with pytest.raises(ModelStreamBroken):
        async for delta in client.stream(MESSAGES):
            received.append(delta)
    await client.close()
    assert len(received) == 2 and len(server.requests) == 1


async def test_breaker_opens_after_repeated_failures_and_then_fails_fast(server: FakeChatModel) -> None:
    server.reset(Behaviour(fail_status=500))
    client = _client(server, retries=0)
    for _ in range(3):
        with pytest.raises(ModelUnavailable):
            [d async for d in client.stream(MESSAGES)]
    assert not client.available and len(server.requests) == 3
    server.reset()  # healthy again, but the breaker has not let a trial through yet
    with pytest.raises(ModelUnavailable, match="circuit open"):
        [d async for d in client.stream(MESSAGES)]
    await client.close()
    assert server.requests == []


async def test_client_errors_are_not_retried_and_unreachable_endpoints_are_unavailable(server: FakeChatModel) -> None:
    server.reset(Behaviour(fail_status=400))
    client = _client(server)
    with pytest.raises(ModelUnavailable, match="HTTP 400"):
        [d async for d in client.stream(MESSAGES)]
    await client.close()
    assert len(server.requests) == 1
    dead = ChatClient("cloud", ChatEndpoint(base_url="http://127.0.0.1:9/v1", model="x", retries=1))
    with pytest.raises(ModelUnavailable, match="unreachable"):
        [d async for d in dead.stream(MESSAGES)]
    await dead.close()
