"""Load: 200 concurrent JSON clients through Envoy for 60 s, mixed with 8 voice Converse streams of recorded speech,
against the embedded system. The target is no error at all; the table gives p50 / p99 per kind of request, the
JSON requests/s, and the voice streams' latency from the end of a spoken question to the first answer audio.

Each JSON client is a signed-in account working on its own resources, with a think time between requests: reads of
its profile and conversation, ListConversations, POST /v1/search, Ask on a small knowledge base with the extractive
generator, and now and then a refresh or a new login. Each voice stream asks the spoken questions of
../shared/eval/speech (about the indexed essay) one turn after the other, paced at real time.

`python -m bench.load_bench --smoke` runs a short, small version (10 s, 20 clients, 1 stream) to try it. Needs
../shared/eval/speech; skips cleanly without it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx

from bench.common import embedded_system, median, percentile, table
from bench.voice_eval import book, first_audio, index_book
from tests.support.admin import create_admin
from tests.support.clients import STRONG_PASSWORD, Account, register_and_login
from tests.support.voice import Utterance, utterances
from voiceassist.rag.v1 import rag_pb2, rag_pb2_grpc
from voiceassist.voice.v1 import voice_pb2_grpc

SECONDS, CLIENTS, STREAMS = 60, 200, 8
SMOKE = (10, 20, 1)
THINK_SECONDS = (0.5, 1.5)  # a person reads the answer before the next click: uniform between these
# Kind of request -> weight in the mix (a client picks its next request at random with these weights).
MIX = {
    "GET /v1/users/me": 15,
    "GET /v1/conversations/{id}": 10,
    "GET /v1/conversations/{id}/messages": 10,
    "ListConversations": 15,
    "POST /v1/search": 25,
    "Ask": 15,
    "Refresh": 7,
    "Login": 3,
}


@dataclass
class Client:
    """One signed-in JSON client and the conversation it works in."""

    account: Account
    conversation_id: str
    access_token: str
    refresh_token: str


@dataclass
class Tally:
    """What the run measured."""

    latencies: dict[str, list[float]]  # kind -> ms of successful requests
    errors: Counter[str]  # kind -> failed requests
    samples: Counter[str]  # "kind: status reason" -> count, to say what failed
    voice_client_ms: list[float]
    voice_server_ms: list[float]
    voice_failed: int = 0


def _prepare(channel: grpc.Channel, index: int) -> Client:
    account = register_and_login(channel)
    conversation = rag_pb2_grpc.RagServiceStub(channel).CreateConversation(
        rag_pb2.CreateConversationRequest(title=f"load {index}"), metadata=account.metadata, timeout=30
    )
    return Client(account, conversation.conversation.id, account.access_token, account.refresh_token)


def _request(client: Client, kind: str, questions: list[str]) -> tuple[str, str, dict | None]:
    """(method, path, JSON body) of one request of `kind` by `client`."""
    conversation = f"/v1/conversations/{client.conversation_id}"
    return {
        "GET /v1/users/me": ("GET", "/v1/users/me", None),
        "GET /v1/conversations/{id}": ("GET", conversation, None),
        "GET /v1/conversations/{id}/messages": ("GET", f"{conversation}/messages", None),
        "ListConversations": ("GET", "/v1/conversations", None),
        "POST /v1/search": ("POST", "/v1/search", {"query": random.choice(questions)}),
        "Ask": ("POST", f"{conversation}:ask", {"query": random.choice(questions)}),
        "Refresh": ("POST", "/v1/auth:refresh", {"refreshToken": client.refresh_token}),
        "Login": ("POST", "/v1/auth:login", {"email": client.account.email, "password": STRONG_PASSWORD}),
    }[kind]


async def _json_client(http: httpx.AsyncClient, client: Client, questions: list[str], until: float, tally: Tally):
    kinds, weights = list(MIX), list(MIX.values())
    await asyncio.sleep(random.uniform(0, THINK_SECONDS[1]))  # clients arrive spread out, not in one burst
    while time.monotonic() < until:
        kind = random.choices(kinds, weights)[0]
        method, path, body = _request(client, kind, questions)
        started = time.perf_counter()
        try:
            reply = await http.request(
                method, path, json=body, headers={"authorization": f"Bearer {client.access_token}"}
            )
        except httpx.HTTPError as exc:
            tally.errors[kind] += 1
            tally.samples[f"{kind}: {type(exc).__name__}"] += 1
        else:
            if reply.is_success:
                tally.latencies[kind].append((time.perf_counter() - started) * 1000)
                if kind in ("Refresh", "Login"):
                    tokens = reply.json()
                    client.access_token, client.refresh_token = tokens["accessToken"], tokens["refreshToken"]
            else:
                tally.errors[kind] += 1
                tally.samples[f"{kind}: {reply.status_code} {reply.text[:120]}"] += 1
        await asyncio.sleep(random.uniform(*THINK_SECONDS))


async def _voice_stream(stub, speaker: Account, questions: list[Utterance], until: float, tally: Tally) -> None:
    turn = 0
    while time.monotonic() < until:
        question = questions[turn % len(questions)]
        turn += 1
        try:
            client_ms, server_ms, _cited = await first_audio(stub, speaker.metadata, [question])
        except (grpc.aio.AioRpcError, AssertionError, TimeoutError):
            tally.voice_failed += 1
            continue
        tally.voice_client_ms += client_ms
        tally.voice_server_ms += server_ms


async def _run(envoy: str, clients: list[Client], speakers: list[Account], corpus: list[Utterance], seconds: int):
    questions = [u.text for u in corpus if u.id.startswith("lj_")]
    spoken = sorted((u for u in corpus if u.id.startswith("lj_")), key=lambda u: u.duration_s)[:8]
    tally = Tally(defaultdict(list), Counter(), Counter(), [], [])
    limits = httpx.Limits(max_connections=len(clients), max_keepalive_connections=len(clients))
    async with (
        httpx.AsyncClient(base_url=f"http://{envoy}", limits=limits, timeout=120) as http,
        grpc.aio.insecure_channel(envoy) as channel,
    ):
        voice = voice_pb2_grpc.VoiceServiceStub(channel)
        until = time.monotonic() + seconds
        speaking = [_voice_stream(voice, s, spoken[i:] + spoken[:i], until, tally) for i, s in enumerate(speakers)]
        voice_done = asyncio.gather(*speaking)
        started = time.perf_counter()
        await asyncio.gather(*(_json_client(http, c, questions, until, tally) for c in clients))
        elapsed = time.perf_counter() - started  # of the JSON load alone: a voice turn may end a little later
        await voice_done
    return tally, elapsed


def _ms(values: list[float]) -> str:
    return f"{median(values):.0f} / {percentile(values, 99):.0f} ms" if values else "none"


def main(seconds: int = SECONDS, clients: int = CLIENTS, streams: int = STREAMS) -> None:
    corpus = utterances()
    if not corpus:
        print("\nload: ../shared/eval/speech is absent; skipped")
        return
    with embedded_system() as system:
        assert system.envoy is not None
        server = system.servers[0]
        with grpc.insecure_channel(server.address) as channel:
            admin = create_admin(system, channel)
            with ThreadPoolExecutor(4) as pool:  # registering hashes a password: spread over the cores
                prepared = list(pool.map(lambda i: _prepare(channel, i), range(clients)))
            speakers = [register_and_login(channel) for _ in range(streams)]
        index_book(server.address, admin, book(corpus))
        before = f"{os.getloadavg()[0]:.2f}"
        tally, elapsed = asyncio.run(_run(system.envoy.address, prepared, speakers, corpus, seconds))
    done = sum(len(v) for v in tally.latencies.values())
    failed = sum(tally.errors.values())
    total = done + failed
    rows: list[tuple[str, ...]] = [
        ("JSON error rate (failed / requests)", f"{failed / max(total, 1):.3%} ({failed} / {total})", "0",
         "yes" if failed == 0 else "no"),
        ("JSON requests/s through Envoy", f"{done / elapsed:.0f}"),
    ]  # fmt: skip
    for kind in MIX:
        rows.append(
            (
                f"  {kind} p50 / p99",
                f"{_ms(tally.latencies[kind])} ({len(tally.latencies[kind])} ok, {tally.errors[kind]} failed)",
            )
        )
    rows.append(
        ("voice turns completed / failed", f"{len(tally.voice_client_ms)} / {tally.voice_failed}", "0 failed",
         "yes" if tally.voice_failed == 0 else "no")
    )  # fmt: skip
    rows.append(("  end of utterance -> first answer audio p50 / p99, client", _ms(tally.voice_client_ms)))
    rows.append(("  same, server TurnTimings.first_audio_ms p50 / p99", _ms(tally.voice_server_ms)))
    rows += [(f"  failure: {sample}", str(count)) for sample, count in tally.samples.most_common(5)]
    rows.append(("  load average before / after", f"{before} / {os.getloadavg()[0]:.2f}"))
    table(
        f"load: {clients} JSON clients (think time {THINK_SECONDS[0]}-{THINK_SECONDS[1]} s) + {streams} voice "
        f"Converse streams for {seconds} s (embedded mode through Envoy, extractive generator; the clients share the "
        "2 cores)",
        rows,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="10 s, 20 clients, 1 voice stream")
    main(*(SMOKE if parser.parse_args().smoke else (SECONDS, CLIENTS, STREAMS)))
