"""The rag service end to end: conversations through Envoy JSON, answers over documents indexed by the real search
service, idempotent questions, PHI detection, and model routing against local servers speaking the OpenAI protocol
as the "cloud" and "local" models (the only stand-ins: a cloud model is a paid external API)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from tests.e2e.test_search import watch
from tests.support.admin import create_admin
from tests.support.clients import Account, error_reason, json_reason, register_and_login
from tests.support.fake_llm import Behaviour, FakeChatModel
from tests.support.mesh import Cluster, Server
from voiceassist.common.v1 import clinical_pb2
from voiceassist.rag.v1 import rag_pb2, rag_pb2_grpc
from voiceassist.search.v1 import search_pb2, search_pb2_grpc

R = rag_pb2
GUIDE = (
    "# Rate control in atrial fibrillation\n\n"
    "Beta blockers such as metoprolol are first-line agents for rate control in atrial fibrillation. "
    "Diltiazem is an alternative when beta blockers are contraindicated. "
    "Digoxin adds rate control in heart failure but acts slowly.\n\n"
    "Anticoagulation decisions use the CHA2DS2-VASc score, independent of the rate or rhythm strategy."
)
QUESTION = "Which agents are first-line for rate control in atrial fibrillation?"
PHI_QUESTION = "John Smith, MRN 4482913, has atrial fibrillation: which agents are first-line for rate control?"


@dataclass
class Knowledge:
    """A document indexed by the real search service, and the accounts that use it."""

    admin: Account
    user: Account
    other: Account
    document_id: str
    chunk_ids: set[str]


@pytest.fixture(scope="module")
def knowledge(embedded: Cluster) -> Knowledge:
    """The rate-control guideline, created by an admin and INDEXED; two plain accounts."""
    with grpc.insecure_channel(embedded.servers[0].address) as channel:
        admin = create_admin(embedded, channel)
        search = search_pb2_grpc.SearchServiceStub(channel)
        meta = search_pb2.DocumentMetadata(
            title=f"AF rate control {uuid.uuid4().hex[:6]}", source_type="guideline", specialty="cardiology",
            media_type="text/markdown",
        )  # fmt: skip
        doc = search.CreateDocument(
            search_pb2.CreateDocumentRequest(metadata=meta, text=GUIDE), metadata=admin.metadata
        )
        final = watch(search, admin, doc.document.id)[-1]
        assert final.document.status == search_pb2.DOCUMENT_STATUS_INDEXED, final.document.error
        found = search.Search(
            search_pb2.SearchRequest(query=QUESTION, filters=search_pb2.SearchFilters(document_ids=[doc.document.id])),
            metadata=admin.metadata,
        )
        return Knowledge(
            admin, register_and_login(channel), register_and_login(channel), doc.document.id,
            {r.chunk_id for r in found.results},
        )  # fmt: skip


@pytest.fixture
def rag(edge_channel: grpc.Channel) -> rag_pb2_grpc.RagServiceStub:
    """A RagService stub through Envoy (embedded system, extractive answers)."""
    return rag_pb2_grpc.RagServiceStub(edge_channel)


def _conversation(rag: rag_pb2_grpc.RagServiceStub, account: Account, **fields) -> R.Conversation:
    return rag.CreateConversation(R.CreateConversationRequest(**fields), metadata=account.metadata).conversation


def _messages(rag: rag_pb2_grpc.RagServiceStub, account: Account, conversation_id: str) -> list[R.Message]:
    reply = rag.ListMessages(R.ListMessagesRequest(conversation_id=conversation_id), metadata=account.metadata)
    return list(reply.messages)


def _ask_fresh(
    stub: rag_pb2_grpc.RagServiceStub, account: Account, query: str, **fields
) -> tuple[R.Conversation, R.AskResponse]:
    """Ask in a new conversation."""
    conversation = _conversation(stub, account)
    request = R.AskRequest(conversation_id=conversation.id, query=query, **fields)
    return conversation, stub.Ask(request, metadata=account.metadata, timeout=60)


def _stream_json(http: httpx.Client, account: Account, conversation_id: str, body: dict) -> list[dict]:
    reply = http.post(f"/v1/conversations/{conversation_id}:streamAsk", json=body, headers=account.headers)
    assert reply.status_code == 200, reply.text
    return reply.json()


# --- conversations


def test_conversations_crud_pages_most_recent_first_and_archive(edge_http: httpx.Client, knowledge: Knowledge) -> None:
    headers = knowledge.user.headers
    made = [
        edge_http.post("/v1/conversations", json={"title": f"c{n}"}, headers=headers).json()["conversation"]
        for n in range(3)
    ]
    assert made[0]["title"] == "c0" and made[0]["messageCount"] == 0 and made[0]["archived"] is False
    untitled = edge_http.post("/v1/conversations", json={}, headers=headers).json()["conversation"]
    assert untitled["title"] == "New conversation"

    # Touch c0 so it becomes the most recently updated.
    patched = edge_http.patch(
        f"/v1/conversations/{made[0]['id']}",
        params={"updateMask": "title,settings"},
        json={"title": "renamed", "settings": {"systemPrompt": "Be brief.", "answerStyle": "ANSWER_STYLE_DETAILED",
                                               "specialty": "Cardiology"}},
        headers=headers,
    )  # fmt: skip
    assert patched.status_code == 200, patched.text
    settings = patched.json()["conversation"]["settings"]
    assert settings == {"systemPrompt": "Be brief.", "answerStyle": "ANSWER_STYLE_DETAILED", "specialty": "cardiology"}

    first = edge_http.get("/v1/conversations", params={"pageSize": 2}, headers=headers).json()
    assert [c["id"] for c in first["conversations"]] == [made[0]["id"], untitled["id"]]
    second = edge_http.get(
        "/v1/conversations", params={"pageSize": 2, "pageToken": first["nextPageToken"]}, headers=headers
    ).json()
    assert [c["id"] for c in second["conversations"]] == [made[2]["id"], made[1]["id"]]

    archive = edge_http.patch(
        f"/v1/conversations/{made[2]['id']}", params={"updateMask": "archived"}, json={"archived": True},
        headers=headers,
    )  # fmt: skip
    assert archive.json()["conversation"]["archived"] is True
    listed = edge_http.get("/v1/conversations", headers=headers).json()["conversations"]
    assert made[2]["id"] not in {c["id"] for c in listed}
    with_archived = edge_http.get("/v1/conversations", params={"includeArchived": True}, headers=headers).json()
    assert made[2]["id"] in {c["id"] for c in with_archived["conversations"]}

    # A token is bound to its query; bad input is a client error with a reason.
    mismatched = edge_http.get(
        "/v1/conversations", params={"pageToken": first["nextPageToken"], "includeArchived": True}, headers=headers
    )
    assert mismatched.status_code == 400 and json_reason(mismatched.json()) == "INVALID_PAGE_TOKEN"
    too_long = edge_http.post("/v1/conversations", json={"title": "x" * 201}, headers=headers)
    assert too_long.status_code == 400 and json_reason(too_long.json()) == "VALIDATION_ERROR"
    no_mask = edge_http.patch(f"/v1/conversations/{made[1]['id']}", json={"title": "t"}, headers=headers)
    assert no_mask.status_code == 400 and json_reason(no_mask.json()) == "VALIDATION_ERROR"

    gone = edge_http.delete(f"/v1/conversations/{made[1]['id']}", headers=headers)
    assert gone.status_code == 200
    assert edge_http.get(f"/v1/conversations/{made[1]['id']}", headers=headers).status_code == 404
    assert edge_http.get("/v1/conversations").status_code == 401


def test_another_users_conversation_is_not_found_for_every_method(
    rag: rag_pb2_grpc.RagServiceStub, edge_http: httpx.Client, knowledge: Knowledge
) -> None:
    mine = _conversation(rag, knowledge.user, title="private")
    rag.Ask(R.AskRequest(conversation_id=mine.id, query=QUESTION), metadata=knowledge.user.metadata, timeout=60)
    other = knowledge.other.metadata
    calls = [
        lambda: rag.GetConversation(R.GetConversationRequest(conversation_id=mine.id), metadata=other),
        lambda: rag.ListMessages(R.ListMessagesRequest(conversation_id=mine.id), metadata=other),
        lambda: rag.UpdateConversation(
            R.UpdateConversationRequest(
                conversation=R.Conversation(id=mine.id, title="mine now"), update_mask={"paths": ["title"]}
            ),
            metadata=other,
        ),
        lambda: rag.Ask(R.AskRequest(conversation_id=mine.id, query=QUESTION), metadata=other),
        lambda: list(rag.StreamAsk(R.StreamAskRequest(conversation_id=mine.id, query=QUESTION), metadata=other)),
        lambda: rag.DeleteConversation(R.DeleteConversationRequest(conversation_id=mine.id), metadata=other),
        lambda: rag.GetConversation(R.GetConversationRequest(conversation_id="not-a-uuid"), metadata=other),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(caught.value) == "NOT_FOUND"
    assert knowledge.other.user_id not in str(caught.value.details())
    # Not listed either, and still intact for its owner.
    listed = edge_http.get("/v1/conversations", headers=knowledge.other.headers).json()["conversations"]
    assert mine.id not in {c["id"] for c in listed}
    kept = rag.GetConversation(R.GetConversationRequest(conversation_id=mine.id), metadata=knowledge.user.metadata)
    assert kept.conversation.title == "private" and kept.conversation.message_count == 2


# --- answers (extractive: the embedded system has no model configured)


def test_answer_over_an_indexed_document_cites_its_chunk(
    rag: rag_pb2_grpc.RagServiceStub, knowledge: Knowledge
) -> None:
    conversation, answer = _ask_fresh(rag, knowledge.user, QUESTION)
    assert "metoprolol" in answer.content and "[" in answer.content
    ours = [c for c in answer.citations if c.document_id == knowledge.document_id]
    assert ours and {c.chunk_id for c in ours} <= knowledge.chunk_ids
    assert all(f"[{c.index}]" in answer.content for c in answer.citations)
    assert ours[0].title.startswith("AF rate control") and ours[0].snippet
    assert answer.model_used == "extractive" and answer.routing_reason == "no_phi_no_model_extractive"
    assert not answer.phi_detected and answer.timings.total_ms > 0 and answer.timings.retrieval_ms > 0

    messages = _messages(rag, knowledge.user, conversation.id)
    assert [m.role for m in messages] == [R.MESSAGE_ROLE_ASSISTANT, R.MESSAGE_ROLE_USER]  # most recent first
    assert messages[0].id == answer.message_id and messages[1].id == answer.question_message_id
    assert messages[1].content == QUESTION and [c.chunk_id for c in messages[0].citations] == [
        c.chunk_id for c in answer.citations
    ]


def test_question_outside_the_knowledge_base_gets_an_honest_not_found(
    rag: rag_pb2_grpc.RagServiceStub, knowledge: Knowledge
) -> None:
    _, answer = _ask_fresh(rag, knowledge.user, "Which quarks are produced in zqxv gluon fusion jets?")
    assert "could not find this in the knowledge base" in answer.content
    assert list(answer.citations) == [] and answer.model_used == "extractive"


def test_phi_question_is_flagged_and_answered_without_any_model(
    rag: rag_pb2_grpc.RagServiceStub, knowledge: Knowledge, embedded: Cluster
) -> None:
    conversation, answer = _ask_fresh(rag, knowledge.user, PHI_QUESTION)
    assert answer.phi_detected
    assert {R.PHI_TYPE_NAME, R.PHI_TYPE_MEDICAL_RECORD_NUMBER} <= set(answer.phi_types)
    assert answer.model_used == "extractive" and answer.routing_reason == "phi_present_no_local_model_extractive"
    question = _messages(rag, knowledge.user, conversation.id)[1]
    assert question.phi_detected and R.PHI_TYPE_NAME in question.phi_types
    # Logs and audit events say what happened, never what was asked.
    log = embedded.servers[0].log_text()
    assert "/voiceassist.rag.v1.RagService/Ask" in log and "John Smith" not in log and "4482913" not in log


def test_same_client_message_id_gives_one_question_and_one_answer(
    rag: rag_pb2_grpc.RagServiceStub, knowledge: Knowledge
) -> None:
    conversation = _conversation(rag, knowledge.user)
    key = f"retry-{uuid.uuid4().hex}"
    request = R.AskRequest(conversation_id=conversation.id, query=QUESTION, client_message_id=key)
    # Concurrent duplicates (a client that retried before the first reply), then a late retry, then a stream retry.
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: rag.Ask(request, metadata=knowledge.user.metadata, timeout=60), range(4)))
    late = rag.Ask(request, metadata=knowledge.user.metadata, timeout=60)
    streamed = list(
        rag.StreamAsk(
            R.StreamAskRequest(conversation_id=conversation.id, query=QUESTION, client_message_id=key),
            metadata=knowledge.user.metadata,
            timeout=60,
        )
    )
    assert len({r.message_id for r in [*replies, late]}) == 1
    assert {r.content for r in replies} == {late.content} and streamed[-1].answer.message_id == late.message_id
    messages = _messages(rag, knowledge.user, conversation.id)
    assert len(messages) == 2 and {m.client_message_id for m in messages} == {key}

    with pytest.raises(grpc.RpcError) as caught:
        rag.Ask(
            R.AskRequest(conversation_id=conversation.id, query="a different question", client_message_id=key),
            metadata=knowledge.user.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(_messages(rag, knowledge.user, conversation.id)) == 2


def test_extractive_stream_through_envoy_json_ends_with_citations_and_answer(
    rag: rag_pb2_grpc.RagServiceStub, edge_http: httpx.Client, knowledge: Knowledge
) -> None:
    conversation = _conversation(rag, knowledge.user)
    events = _stream_json(edge_http, knowledge.user, conversation.id, {"query": QUESTION})
    deltas = [e["delta"] for e in events if "delta" in e]
    assert len(deltas) >= 2 and "citations" in events[-2] and "answer" in events[-1]
    answer = events[-1]["answer"]
    assert "".join(deltas) == answer["content"] and answer["modelUsed"] == "extractive"
    assert answer["timings"]["firstTokenMs"] > 0
    assert any(c["documentId"] == knowledge.document_id for c in events[-2]["citations"]["citations"])


def test_bad_questions_are_client_errors(edge_http: httpx.Client, rag, knowledge: Knowledge) -> None:
    conversation = _conversation(rag, knowledge.user)
    ask = f"/v1/conversations/{conversation.id}:ask"
    for body in ({"query": ""}, {"query": "   "}, {"query": "x" * 4001},
                 {"query": "ok?", "clinicalContext": {"age": 200}},
                 {"query": "ok?", "clinicalContext": {"notes": "n" * 2001}}):  # fmt: skip
        reply = edge_http.post(ask, json=body, headers=knowledge.user.headers)
        assert reply.status_code == 400 and json_reason(reply.json()) == "VALIDATION_ERROR", body
    assert edge_http.post(ask, json={"query": "ok?"}).status_code == 401
    stream = edge_http.post(f"/v1/conversations/{uuid.uuid4()}:streamAsk", json={"query": "ok?"},
                            headers=knowledge.user.headers)  # fmt: skip
    # An error before the stream's first message is a real HTTP error for JSON clients.
    assert stream.status_code == 404
    assert stream.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0] and json_reason(stream.json()) == "NOT_FOUND"


# --- PHI detection


def test_detect_phi_finds_each_identifier_type_and_leaves_eponyms_alone(
    edge_http: httpx.Client, knowledge: Knowledge
) -> None:
    text = (
        "Patient John Smith, born 03/14/1952, now 92 years old, phone 555-867-5309, email jane.doe@example.com, "
        "SSN 123-45-6789, MRN 4482913, member ID XJH-99812, account number 88127731, driver's license D1234567, "
        "license plate 7ABC123, pacemaker serial number PM-22841, lives at 42 Elm Street, Springfield, IL 62704, "
        "portal https://mychart.example.org/p/123 from 10.20.30.40. He has Parkinson's disease and takes Ativan."
    )
    reply = edge_http.post("/v1/phi:detect", json={"text": text}, headers=knowledge.user.headers)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    found = {e["type"] for e in body["entities"]}
    expected = {f"PHI_TYPE_{t}" for t in (
        "NAME", "DATE", "AGE", "PHONE_NUMBER", "EMAIL_ADDRESS", "SSN", "MEDICAL_RECORD_NUMBER", "HEALTH_PLAN_NUMBER",
        "ACCOUNT_NUMBER", "LICENSE_NUMBER", "VEHICLE_IDENTIFIER", "DEVICE_IDENTIFIER", "LOCATION", "ZIP_CODE", "URL",
        "IP_ADDRESS",
    )}  # fmt: skip
    assert expected <= found, expected - found
    assert body["phiDetected"] is True
    for eponym in ("Parkinson's disease", "Ativan"):
        at = text.index(eponym)
        assert all(e["end"] <= at or e["start"] >= at + len(eponym) for e in body["entities"]), eponym
    redacted = body["redactedText"]
    assert "John Smith" not in redacted and "[NAME]" in redacted and "Parkinson's disease" in redacted

    clean = edge_http.post("/v1/phi:detect", json={"text": "Is levodopa first line in Parkinson's disease?"},
                           headers=knowledge.user.headers).json()  # fmt: skip
    assert clean["phiDetected"] is False and clean["entities"] == []
    too_long = edge_http.post("/v1/phi:detect", json={"text": "a" * 20001}, headers=knowledge.user.headers)
    assert too_long.status_code == 400 and json_reason(too_long.json()) == "VALIDATION_ERROR"
    assert edge_http.post("/v1/phi:detect", json={"text": "x"}).status_code == 401


# --- model routing: a rag process with "cloud" and "local" endpoints, behind its own Envoy


@dataclass
class ModelSystem:
    """A rag server using the fake models, its own Envoy, and the embedded system for auth and search."""

    cloud: FakeChatModel
    local: FakeChatModel
    rag: Server
    http: httpx.Client
    stub: rag_pb2_grpc.RagServiceStub
    restart: Callable[[], Server]  # kill -9 aside, a rag process on the same port with the same settings


@pytest.fixture(scope="module")
def models(embedded: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelSystem]:
    cloud, local = FakeChatModel("cloud").start(), FakeChatModel("local").start()
    workdir: Path = tmp_path_factory.mktemp("rag-models")
    cluster = Cluster.create(workdir, mesh=False, DATA_DIR=str(workdir / "data"))
    shared = embedded.servers[0]
    for name in ("auth", "audit", "search", "voice"):
        cluster.point_at(name, shared)
    settings = {
        "RAG_CLOUD_BASE_URL": cloud.base_url, "RAG_CLOUD_MODEL": "big-cloud", "RAG_CLOUD_API_KEY": "sk-test",
        "RAG_LOCAL_BASE_URL": local.base_url, "RAG_LOCAL_MODEL": "small-local", "RAG_MODEL_RETRIES": "0",
        "RAG_BREAKER_FAILURE_THRESHOLD": "100",
    }  # fmt: skip
    try:
        server = cluster.start("rag", **settings)
        envoy = cluster.start_envoy({"auth": shared, "audit": shared, "search": shared, "voice": shared, "rag": server})
        with httpx.Client(base_url=envoy.http, timeout=60) as http, grpc.insecure_channel(envoy.address) as channel:

            def restart() -> Server:
                again = cluster.start("rag", port=server.port, **settings)
                deadline = time.monotonic() + 30  # until Envoy's health checks route to it again
                while envoy.endpoints("rag")[again.address].get("health_flags") != "healthy":
                    assert time.monotonic() < deadline, envoy.endpoints("rag")
                    time.sleep(0.2)
                return again

            yield ModelSystem(cloud, local, server, http, rag_pb2_grpc.RagServiceStub(channel), restart)
    finally:
        cluster.stop()
        cloud.stop()
        local.stop()


def test_phi_never_reaches_the_cloud_model(models: ModelSystem, knowledge: Knowledge) -> None:
    for endpoint in (models.cloud, models.local):
        endpoint.reset()
    _, answer = _ask_fresh(models.stub, knowledge.user, PHI_QUESTION)
    assert answer.model_used == "local:small-local" and answer.routing_reason == "phi_present_local_model"
    assert models.cloud.requests == []
    (prompt,) = models.local.prompts()
    assert "John Smith" in prompt and "metoprolol" in prompt  # the question and the retrieved passage
    assert answer.content == "".join(models.local.behaviour.pieces)
    assert [c.document_id for c in answer.citations][:1] and answer.citations[0].index == 1

    # PHI only in the clinical context: still local. The local model gets the context.
    models.local.reset()
    context = clinical_pb2.ClinicalContext(age=93, notes="Lives with daughter Mary Jones.", medications=["metoprolol"])
    _, answer = _ask_fresh(models.stub, knowledge.user, QUESTION, clinical_context=context)
    assert answer.phi_detected and answer.model_used == "local:small-local"
    assert models.cloud.requests == [] and "Mary Jones" in models.local.prompts()[0]

    # The local model is down: the answer is extractive, and still nothing goes to the cloud.
    models.local.reset(Behaviour(fail_status=503))
    _, answer = _ask_fresh(models.stub, knowledge.user, PHI_QUESTION)
    assert answer.model_used == "extractive" and answer.routing_reason == "phi_present_local_unavailable_extractive"
    assert models.cloud.requests == [] and len(models.local.requests) == 1
    models.local.reset()


def test_question_without_phi_goes_to_the_cloud_without_clinical_context_or_phi_history(
    models: ModelSystem, knowledge: Knowledge
) -> None:
    for endpoint in (models.cloud, models.local):
        endpoint.reset()
    settings = R.ConversationSettings(
        system_prompt="Answer for a cardiology fellow.", answer_style=R.ANSWER_STYLE_DETAILED
    )
    conversation = _conversation(models.stub, knowledge.user, settings=settings)
    ask = lambda query, **fields: models.stub.Ask(  # noqa: E731
        R.AskRequest(conversation_id=conversation.id, query=query, **fields), metadata=knowledge.user.metadata,
        timeout=60,
    )  # fmt: skip
    ask(PHI_QUESTION)  # an earlier turn with PHI, answered locally
    answer = ask(QUESTION, clinical_context=clinical_pb2.ClinicalContext(sex="female", specialty="cardiology"))
    assert answer.model_used == "cloud:big-cloud" and answer.routing_reason == "no_phi_cloud_model"
    assert not answer.phi_detected
    (request,) = models.cloud.requests
    assert request["model"] == "big-cloud" and request["auth"] == "Bearer sk-test" and request["stream"] is True
    prompt = models.cloud.prompts()[0]
    assert QUESTION in prompt and "metoprolol" in prompt
    assert "Answer for a cardiology fellow." in prompt and "thorough" in prompt  # the conversation's settings
    assert "John Smith" not in prompt and "4482913" not in prompt and "female" not in prompt

    # A lower-case transcript could hide a bare name the detector cannot see: never to the cloud.
    models.cloud.reset()
    models.local.reset()
    answer = ask("does metoprolol help john smith with rate control")
    assert answer.model_used == "local:small-local" and answer.routing_reason == "names_unverifiable_local_model"
    assert models.cloud.requests == []
    answer = ask("How does metoprolol help rate control?")  # cased again: cloud, without the unverifiable turn
    assert answer.model_used == "cloud:big-cloud" and "john smith" not in models.cloud.prompts()[0]

    # The cloud is down: the local model takes over.
    models.cloud.reset(Behaviour(fail_status=503))
    models.local.reset()
    answer = ask("How does digoxin help rate control in heart failure?")
    assert answer.model_used == "local:small-local"
    assert answer.routing_reason == "no_phi_cloud_unavailable_local_model"
    models.cloud.reset()


def test_model_stream_arrives_through_envoy_json_as_several_deltas(models: ModelSystem, knowledge: Knowledge) -> None:
    pieces = ["Metoprolol ", "and other ", "beta blockers ", "are first-line ", "[1]."]
    models.cloud.reset(Behaviour(pieces=pieces))
    conversation = _conversation(models.stub, knowledge.user)
    chunks: list[str] = []
    url = f"/v1/conversations/{conversation.id}:streamAsk"
    with models.http.stream("POST", url, json={"query": QUESTION}, headers=knowledge.user.headers) as reply:
        assert reply.status_code == 200
        chunks = list(reply.iter_text())
    events = json.loads("".join(chunks))
    assert [e["delta"] for e in events if "delta" in e] == pieces
    assert list(events[-2]) == ["citations"] and events[-2]["citations"]["citations"][0]["index"] == 1
    answer = events[-1]["answer"]
    assert answer["content"] == "".join(pieces) and answer["modelUsed"] == "cloud:big-cloud"
    assert answer["routingReason"] == "no_phi_cloud_model" and answer["timings"]["firstTokenMs"] > 0


def test_model_failure_mid_stream_ends_the_json_stream_with_an_error_message(
    models: ModelSystem, knowledge: Knowledge
) -> None:
    models.cloud.reset(Behaviour(break_after=2))
    conversation = _conversation(models.stub, knowledge.user)
    key = f"torn-{uuid.uuid4().hex}"
    events = _stream_json(models.http, knowledge.user, conversation.id, {"query": QUESTION, "clientMessageId": key})
    assert [e["delta"] for e in events[:-1]] == models.cloud.behaviour.pieces[:2]
    error = events[-1]["error"]
    assert error["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert json_reason(error) == "BACKEND_UNAVAILABLE"
    # Nothing half-written was stored; a retry with the same key answers it once the model is back.
    models.cloud.reset()
    again = models.stub.Ask(
        R.AskRequest(conversation_id=conversation.id, query=QUESTION, client_message_id=key),
        metadata=knowledge.user.metadata, timeout=60,
    )  # fmt: skip
    assert again.model_used == "cloud:big-cloud"
    assert len(_messages(models.stub, knowledge.user, conversation.id)) == 2


# --- mesh mode: PostgreSQL


def test_mesh_idempotent_questions_and_isolation_on_postgresql(mesh: Cluster, mesh_http: httpx.Client) -> None:
    with grpc.insecure_channel(mesh.envoy.address) as channel:  # type: ignore[union-attr]
        owner, stranger = register_and_login(channel), register_and_login(channel)
        stub = rag_pb2_grpc.RagServiceStub(channel)
        conversation = _conversation(stub, owner, title="mesh")
        request = R.AskRequest(conversation_id=conversation.id, query=QUESTION, client_message_id="mesh-1")
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: stub.Ask(request, metadata=owner.metadata, timeout=60), range(4)))
        assert len({r.message_id for r in replies}) == 1
        assert len(_messages(stub, owner, conversation.id)) == 2
    hidden = mesh_http.get(f"/v1/conversations/{conversation.id}/messages", headers=stranger.headers)
    assert hidden.status_code == 404 and json_reason(hidden.json()) == "NOT_FOUND"
    mine = mesh_http.get(f"/v1/conversations/{conversation.id}", headers=owner.headers).json()["conversation"]
    assert mine["messageCount"] == 2


def test_a_retry_after_a_crash_mid_answer_is_answered_within_one_lease(models: ModelSystem, knowledge: Knowledge):
    # The worker writing the answer renews a short lease; killed, it stops, and the retry takes over. The lease was
    # 120 s, past Envoy's 60 s route timeout: the retry ended as a 504 after a minute.
    models.cloud.reset(Behaviour(pieces=["Beta ", "blockers ", "lower ", "heart ", "rate [1]."], piece_seconds=3))
    conversation = _conversation(models.stub, knowledge.user)
    key = f"crash-{uuid.uuid4().hex}"
    stream = models.stub.StreamAsk(
        R.StreamAskRequest(conversation_id=conversation.id, query=QUESTION, client_message_id=key),
        metadata=knowledge.user.metadata, timeout=60,
    )  # fmt: skip
    assert any(message.HasField("delta") for message in stream)  # stops at the first piece: the answer is under way
    assert models.rag.kill() != 0
    with pytest.raises(grpc.RpcError):
        list(stream)
    models.cloud.reset(Behaviour())
    models.rag = models.restart()
    started = time.monotonic()
    reply = models.stub.Ask(
        R.AskRequest(conversation_id=conversation.id, query=QUESTION, client_message_id=key),
        metadata=knowledge.user.metadata, timeout=30,
    )  # fmt: skip
    assert reply.content and time.monotonic() - started < 15
    messages = _messages(models.stub, knowledge.user, conversation.id)
    assert [m.client_message_id for m in messages] == [key, key]  # one question, one answer


def test_a_slow_answer_is_waited_for_not_taken_over(models: ModelSystem, knowledge: Knowledge) -> None:
    # Longer than a lease (10 s): the writer's renewals keep the retry waiting for its answer, one model call in all.
    models.cloud.reset(Behaviour(pieces=["Beta ", "blockers ", "lower ", "heart ", "rate [1]."], piece_seconds=3))
    conversation = _conversation(models.stub, knowledge.user)
    key = f"slow-{uuid.uuid4().hex}"
    request = R.AskRequest(conversation_id=conversation.id, query=QUESTION, client_message_id=key)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(models.stub.Ask, request, metadata=knowledge.user.metadata, timeout=60)
        time.sleep(2)
        second = pool.submit(models.stub.Ask, request, metadata=knowledge.user.metadata, timeout=60)
        replies = [first.result(), second.result()]
    assert replies[0].message_id == replies[1].message_id
    assert len(models.cloud.requests) == 1  # reset() above forgot the earlier ones
    models.cloud.reset(Behaviour())
