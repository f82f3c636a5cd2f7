"""A local HTTP server speaking the OpenAI chat-completions protocol (streamed and not), standing in for the paid
cloud model and a local model in tests. It records every request so tests can prove what reached which endpoint."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.mesh import free_port


@dataclass
class Behaviour:
    """How the endpoint answers: its reply text in pieces, and failures to simulate."""

    pieces: list[str] = field(
        default_factory=lambda: ["Beta blockers ", "lower heart rate ", "and blood pressure ", "[1]."]
    )
    fail_status: int = 0  # answer every request with this HTTP status (0: answer normally)
    fail_first: int = 0  # answer the first N requests with 503, then normally
    break_after: int = 0  # streaming: drop the connection after this many pieces (0: never)
    piece_seconds: float = 0.0  # streaming: the pause after each piece (a slow model)


class FakeChatModel:
    """One endpoint (`http://127.0.0.1:PORT/v1`) and the requests it received."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.behaviour = Behaviour()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """What RAG_*_BASE_URL should be."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeChatModel:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def reset(self, behaviour: Behaviour | None = None) -> None:
        """Forget recorded requests and set how to answer next."""
        with self._lock:
            self.requests.clear()
            self.behaviour = behaviour or Behaviour()

    def prompts(self) -> list[str]:
        """The text of every message of every recorded request, one string per request."""
        with self._lock:
            return ["\n".join(m["content"] for m in r["messages"]) for r in self.requests]

    def _record(self, body: dict[str, Any]) -> tuple[Behaviour, int]:
        with self._lock:
            self.requests.append(body)
            return self.behaviour, len(self.requests)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                behaviour, count = model._record({**body, "path": self.path, "auth": self.headers.get("authorization")})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "no such path"}})
                if behaviour.fail_status or count <= behaviour.fail_first:
                    return self._send(behaviour.fail_status or 503, {"error": {"message": "unavailable"}})
                if not body.get("stream"):
                    message = {"role": "assistant", "content": "".join(behaviour.pieces)}
                    return self._send(200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for n, piece in enumerate(behaviour.pieces, start=1):
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(behaviour.piece_seconds)
                    if behaviour.break_after and n >= behaviour.break_after:
                        self.wfile.write(b"data: {not json")  # a torn event, then the connection drops
                        self.wfile.flush()
                        self.close_connection = True
                        return
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
