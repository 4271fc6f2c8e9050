"""A fake OpenAI-compatible LLM server on loopback, used by tests and benchmarks instead of a model.

Why a real server and not a mock: retries, timeouts, connection pooling, headers and litellm's own
request shaping only show up over a real socket. Output is deterministic (seeded from the request),
schema-valid when a JSON schema is requested, and fault rules reproduce what real providers do
(429 with Retry-After, hangs, resets, truncated or broken JSON), a fraction of requests at random
(`rate`, drawn from the request and the server's seed, so a run sees the same faults whatever the order its
requests arrive in, and a retry of a request draws anew), a hang that holds one of the server's slots
(`hold_slot`, as a wedged inference server does), a chatty answer (a preamble, `{` written as `(`), an outage
(the port closed for N seconds, then serving again), an overloaded server that answers 429 above N requests in
flight, and a provider that states its requests-per-minute limit in `x-ratelimit-*` headers and enforces it.
Stdlib only, so it starts anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[dict[str, Any]], str | None]
FAULT_KINDS = frozenset({"http", "hang", "invalid_json", "truncate", "reset", "empty", "chatty"})
CHATTY_PREFIX = "Sure! Here is what you asked for: "  # what a chatty model puts before the asked-for answer
_REDACTED_HEADERS = frozenset({"authorization", "api-key"})
# status -> (OpenAI error type, code), so client libraries map injected errors to the right exception
_ERRORS = {
    400: ("invalid_request_error", "invalid_request"), 401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "model_not_found"), 429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"), 503: ("server_error", "overloaded"),
}  # fmt: skip
_FORMATS = {  # string formats pydantic emits for datetime, date, EmailStr, AnyUrl, UUID
    "date-time": "2024-01-01T00:00:00Z", "date": "2024-01-01", "email": "user@example.com",
    "uri": "https://example.com/", "uuid": "00000000-0000-4000-8000-000000000000",
}  # fmt: skip
_WORDS = (
    "data", "model", "river", "quiet", "signal", "garden", "answer", "careful", "bright", "number",
    "simple", "window", "orange", "travel", "library", "summer", "method", "planet", "clear", "gentle",
    "record", "question", "stone", "focus", "balance", "lantern", "market", "useful", "system", "letter",
    "mountain", "thread", "silver", "example", "ocean", "rapid", "detail", "morning", "paper", "bridge",
)  # fmt: skip
_MAX_DEPTH = 8  # recursive schemas (a Node with children: list[Node]) must terminate


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha(value: Any) -> str:
    return hashlib.sha256(_canonical(value).encode()).hexdigest()


def _message_text(messages: list[Any]) -> str:
    """All message contents joined; handles string content and OpenAI content-part lists."""
    parts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "\n".join(parts)


def _sentence(rng: random.Random, low: int = 4, high: int = 12) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def _error(status: int, message: str) -> dict[str, Any]:
    kind, code = _ERRORS.get(status, ("api_error", "error"))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _number(schema: dict[str, Any], rng: random.Random, integer: bool) -> int | float:
    step = 1 if integer else 0.01
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is None and "exclusiveMinimum" in schema:
        low = schema["exclusiveMinimum"] + step
    if high is None and "exclusiveMaximum" in schema:
        high = schema["exclusiveMaximum"] - step
    low = (1 if high is None else min(1, high)) if low is None else low
    high = (10 if low <= 10 else low + 9) if high is None else high
    if math.ceil(low) <= math.floor(high):
        value = rng.randint(math.ceil(low), math.floor(high))
        return value if integer else float(value)
    return min(max(round(rng.uniform(low, high), 4), low), high)


def schema_instance(
    schema: dict[str, Any], rng: random.Random, defs: dict[str, Any] | None = None, depth: int = 0
) -> Any:
    """An instance valid for `schema` (the subset pydantic v2 emits), drawn deterministically from `rng`."""
    defs = {**(defs or {}), **schema.get("$defs", {}), **schema.get("definitions", {})}
    if "$ref" in schema:
        return schema_instance(defs[schema["$ref"].rsplit("/", 1)[-1]], rng, defs, depth)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"]
            null_ok = len(options) < len(schema[key])
            if not options or (null_ok and depth >= _MAX_DEPTH):
                return None
            return schema_instance(options[0], rng, defs, depth)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties", {})
        return {name: schema_instance(sub, rng, defs, depth + 1) for name, sub in props.items()}
    if kind == "array":
        low, high = schema.get("minItems", 0), schema.get("maxItems", math.inf)
        size = low if depth >= _MAX_DEPTH else rng.randint(max(low, min(2, high)), max(low, min(4, high)))
        return [schema_instance(schema.get("items", {}), rng, defs, depth + 1) for _ in range(int(size))]
    if kind in ("integer", "number"):
        return _number(schema, rng, integer=kind == "integer")
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    text = _FORMATS.get(schema.get("format", ""), _sentence(rng))
    while len(text) < schema.get("minLength", 0):
        text += " " + rng.choice(_WORDS)
    return text[: schema["maxLength"]] if "maxLength" in schema else text


def _schema_of(response_format: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema in an OpenAI `json_schema` or a llama.cpp `json_object`+`schema` response_format."""
    if response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema")
    if response_format.get("type") == "json_object":
        return response_format.get("schema")
    return None


class _Stopped(Exception):
    """The server stopped while a request was stalled in a slot."""


def codeclm_text(body: dict[str, Any]) -> str | None:
    """A plain-text model for the CodecLM prompts (`output_mode = "text"`, as for a model litellm does not know):
    answers each step's prompt in the form its text format asks for, deterministically from the request; None
    (the default content) for a request with a response_format or a prompt it does not know."""
    if body.get("response_format"):
        return None
    messages = body.get("messages") or []
    system = str(messages[0].get("content", "")) if messages and isinstance(messages[0], dict) else ""
    user = _message_text(messages[1:])
    rng = random.Random(_sha(messages))
    topic = " ".join(rng.choice(_WORDS) for _ in range(2))
    count = re.search(r"Write (\d+)", user)
    n = int(count[1]) if count else 3
    if system.startswith("You analyse instructions"):
        return f"Use case: {topic} help\nSkills: {rng.choice(_WORDS)} basics, {rng.choice(_WORDS)} planning"
    if system.startswith("You write instructions"):
        return "\n".join(f"{i}. {_sentence(rng)[:-1]} about {topic} (item {rng.randrange(10**9)})?"
                         for i in range(1, n + 1))
    if system.startswith("You judge instructions"):
        rubrics = "\n".join(f"{i}. The instruction needs {rng.choice(_WORDS)} {rng.choice(_WORDS)} depth."
                            for i in range(1, n + 1))
        actions = "\n".join(f"{i}. Add a {rng.choice(_WORDS)} {rng.choice(_WORDS)} requirement."
                            for i in range(1, n + 1))
        return f"Rubrics:\n{rubrics}\n\nActions:\n{actions}"
    if system.startswith("You improve instructions"):
        return f"Improved instruction: {_sentence(rng)[:-1]} with {topic} constraints (v{rng.randrange(10**9)})?"
    if "quality of an answer" in system:
        return f"{rng.randint(1, 10)} {rng.randint(1, 10)}"
    return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # hanging requests must not keep the process (or stop()) waiting
    block_on_close = False
    request_queue_size = 256  # benchmarks open many connections at once
    fake: FakeLLMServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up is normal here
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers, so client pooling is exercised
    server: _HTTPServer
    pending_entry: dict[str, Any] | None = None  # the log entry of the chat request being answered

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request stderr lines; the request log is the record."""

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.server.fake._logged(self, status)  # before the client can see the answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def reset_connection(self) -> None:
        """Close with a TCP RST (SO_LINGER 0) so the client sees a reset, not a clean close."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self.send_json(200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            self.send_json(200, {"object": "list", "data": [{"id": "fake-llm", "object": "model"}]})
        elif path == "/_log":
            self.send_json(200, self.server.fake.requests)
        elif path == "/_stats":
            self.send_json(200, self.server.fake.stats())
        else:
            self.send_json(404, _error(404, f"no route GET {path}"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        fake = self.server.fake
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
        except ValueError as exc:
            return self.send_json(400, _error(400, f"request body is not JSON: {exc}"))
        if path in ("/v1/chat/completions", "/chat/completions"):
            fake._chat(self, path, body)
        elif path == "/_faults":
            try:
                fake.set_faults(body)
            except (TypeError, ValueError) as exc:
                return self.send_json(400, _error(400, str(exc)))
            self.send_json(200, {"ok": True, "rules": len(body)})
        elif path == "/_outage":
            self.send_json(200, {"ok": True})
            threading.Thread(target=fake.outage, args=(float((body or {}).get("seconds", 30)),), daemon=True).start()
        elif path == "/_reset":
            fake.reset()
            self.send_json(200, {"ok": True})
        else:
            self.send_json(404, _error(404, f"no route POST {path}"))


class FakeLLMServer:
    """OpenAI-compatible chat server on loopback with deterministic output, latency, slots and faults."""

    handler_class: type[_Handler] = _Handler  # subclasses add endpoints (codeclm.testing.fake_finetune)

    def __init__(
        self,
        latency: float = 0.0,
        slots: int | None = None,
        responder: Responder | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_inflight: int | None = None,
        rpm: int | None = None,
        keep_bodies: bool = False,
        seed: int = 0,
    ) -> None:
        """`max_inflight`: answer 429 (no Retry-After, like an overloaded proxy) to requests beyond this many in
        flight. `rpm`: state this requests-per-minute limit in x-ratelimit-* headers and enforce it (429 with
        Retry-After). `keep_bodies`: log each request body too (benchmarks replay them)."""
        self.latency, self.responder, self.host, self.port = latency, responder, host, port
        self.max_inflight, self.rpm, self.keep_bodies = max_inflight, rpm, keep_bodies
        self.seed = seed  # draws for fault rules with a `rate`: reproducible per server, see `_draw`
        self._seen: Counter[str] = Counter()  # times each request (by content) has arrived
        self._bucket = (float(rpm or 0), time.monotonic())  # `rpm` as a token bucket: (level, updated)
        self._inflight = 0
        self.max_inflight_seen = 0
        self._slots = threading.BoundedSemaphore(slots) if slots else None
        self._lock = threading.Lock()
        self._log: list[dict[str, Any]] = []
        self._faults: list[dict[str, Any]] = []
        self._hits: list[int] = []
        self._conns: set[socket.socket] = set()
        self._active = 0
        self._ids = itertools.count(1)
        self.max_concurrency_seen = 0
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeLLMServer:
        """Bind (port 0 = any free port) and serve in a daemon thread."""
        self._stopping = threading.Event()
        self._httpd = _HTTPServer((self.host, self.port), self.handler_class)
        self._httpd.fake = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly: wake hanging requests and cut open connections instead of waiting for them."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The api_base for litellm / the OpenAI client."""
        if self._httpd is None:
            raise RuntimeError("FakeLLMServer is not running; call start() first")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """A copy of the log: one entry per chat-completion request, in completion order."""
        with self._lock:
            return [{**entry, "headers": dict(entry["headers"])} for entry in self._log]

    @property
    def in_flight(self) -> int:
        """Chat requests being answered now (hanging ones included): drills signal a run while calls hang."""
        with self._lock:
            return self._inflight

    def set_faults(self, rules: list[dict[str, Any]]) -> None:
        """Replace the fault rules (and their `times` counters); first matching rule wins."""
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise TypeError("fault rules must be a list of objects")
        for rule in rules:
            if rule.get("kind") not in FAULT_KINDS:
                kinds = ", ".join(sorted(FAULT_KINDS))
                raise ValueError(f"unknown fault kind {rule.get('kind')!r}; expected one of {kinds}")
            if rule.get("rate") is not None and not 0 <= float(rule["rate"]) <= 1:
                raise ValueError(f"fault rate must be between 0 and 1, got {rule['rate']!r}")
        with self._lock:
            self._faults, self._hits = [dict(r) for r in rules], [0] * len(rules)

    def outage(self, seconds: float) -> threading.Thread:
        """Go down now (every connection cut, the port refusing new ones) and serve again on the same port after
        `seconds`: an endpoint that crashed and was restarted. Returns the thread that restarts it."""
        self.stop()
        restart = threading.Thread(target=lambda: (time.sleep(seconds), self.start()), name="fake-llm-outage",
                                   daemon=True)
        restart.start()
        return restart

    def reset(self) -> None:
        """Clear the log, the fault rules and the concurrency peaks."""
        with self._lock:
            self._log, self._faults, self._hits, self.max_concurrency_seen = [], [], [], self._active
            self._seen = Counter()
            self.max_inflight_seen = self._inflight
            self._bucket = (float(self.rpm or 0), time.monotonic())

    def stats(self) -> dict[str, Any]:
        """A summary of the log: request count, statuses, first and last request times, concurrency peaks."""
        with self._lock:
            log = list(self._log)
            peaks = {"max_inflight": self.max_inflight_seen, "max_concurrency": self.max_concurrency_seen}
        statuses = Counter(str(e["status"]) for e in log)
        return {"requests": len(log), "statuses": dict(statuses), **peaks,
                "first_t": min((e["t"] for e in log), default=None),
                "last_t_end": max((e["t_end"] for e in log), default=None)}

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _match_fault(self, body: dict[str, Any]) -> dict[str, Any] | None:
        text = _message_text(body.get("messages") or [])
        request = _sha([body.get("model"), body.get("messages"), body.get("temperature"), _max_tokens(body),
                        body.get("response_format")])
        with self._lock:
            self._seen[request] += 1
            arrival = self._seen[request]
            for i, rule in enumerate(self._faults):
                match = rule.get("match")
                if match is not None and match not in text and match != body.get("model"):
                    continue
                if rule.get("times") is not None and self._hits[i] >= rule["times"]:
                    continue
                if rule.get("rate") is not None and self._draw(request, arrival, i) >= float(rule["rate"]):
                    continue
                self._hits[i] += 1
                return rule
        return None

    def _draw(self, request: str, arrival: int, rule: int) -> float:
        """A number in [0, 1) fixed by the seed, the request's content, how many times it has arrived and the
        rule: faults independent of the order concurrent requests arrive in."""
        digest = hashlib.sha256(f"{self.seed}|{rule}|{request}|{arrival}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def _chat(self, handler: _Handler, path: str, body: Any) -> None:
        """Serve one chat completion, applying the first matching fault rule, and log it."""
        body = body if isinstance(body, dict) else {}
        rf = body.get("response_format")
        with self._lock:
            self._inflight += 1
            self.max_inflight_seen = max(self.max_inflight_seen, self._inflight)
            overloaded = self.max_inflight is not None and self._inflight > self.max_inflight
        rule = self._match_fault(body) if isinstance(body.get("messages"), list) and not overloaded else None
        if overloaded:
            rule = {"kind": "http", "status": 429}
        entry: dict[str, Any] = {
            "t": time.monotonic(), "t_end": None, "path": path, "model": body.get("model"),
            "status": 200, "fault": rule["kind"] if rule else None,
            "messages_sha": _sha(body.get("messages")),
            "response_format": rf.get("type") if isinstance(rf, dict) else None,
            "max_tokens": _max_tokens(body), "temperature": body.get("temperature"),
            "headers": {
                k.lower(): "<redacted>" if k.lower() in _REDACTED_HEADERS else v
                for k, v in handler.headers.items()
            },
        }
        if self.keep_bodies:
            entry["body"] = body
        handler.pending_entry = entry
        try:
            self._respond(handler, body, rule)
        finally:
            self._logged(handler, None)  # a reset or a stop: no answer was sent

    def _logged(self, handler: _Handler, status: int | None) -> None:
        """Log the request being answered (once), so a client that has its answer finds it in the log."""
        entry, handler.pending_entry = getattr(handler, "pending_entry", None), None
        if entry is None:
            return
        entry["status"], entry["t_end"] = status, time.monotonic()
        with self._lock:
            self._inflight -= 1
            self._log.append(entry)

    def _rate_headers(self) -> tuple[dict[str, str], float | None]:
        """x-ratelimit-* headers for the stated `rpm` (a token bucket refilled continuously, as OpenAI describes
        its limits), and the seconds to wait when this request finds the bucket empty."""
        if self.rpm is None:
            return {}, None
        now = time.monotonic()
        with self._lock:
            level, updated = self._bucket
            level = min(float(self.rpm), level + (now - updated) * self.rpm / 60)
            wait = None if level >= 1 else (1 - level) * 60 / self.rpm
            if wait is None:
                level -= 1
            self._bucket = (level, now)
        headers = {"x-ratelimit-limit-requests": str(self.rpm), "x-ratelimit-remaining-requests": str(int(level)),
                   "x-ratelimit-reset-requests": f"{(self.rpm - level) * 60 / self.rpm:.3f}s"}
        return headers, wait

    def _respond(self, handler: _Handler, body: dict[str, Any], rule: dict[str, Any] | None) -> int | None:
        kind = rule["kind"] if rule else None
        if not isinstance(body.get("messages"), list):
            handler.send_json(400, _error(400, "'messages' must be a list"))
            return 400
        if kind == "reset":
            handler.reset_connection()
            return None
        limits, wait = self._rate_headers() if kind is None else ({}, None)
        if wait is not None:
            handler.send_json(429, _error(429, f"rate limit of {self.rpm} requests per minute reached"),
                              {**limits, "Retry-After": f"{wait:.3f}"})
            return 429
        if kind == "http":
            status = int(rule.get("status", 429))
            headers = {"Retry-After": str(rule["retry_after"])} if "retry_after" in rule else {}
            if "retry_after_ms" in rule:
                headers["retry-after-ms"] = str(rule["retry_after_ms"])
            payload = rule.get("body") or _error(status, f"injected fault: HTTP {status}")
            handler.send_json(status, payload, headers)
            return status
        hold = kind == "hang" and bool(rule.get("hold_slot"))
        if kind == "hang" and not hold and self._stopping.wait(float(rule.get("seconds", 3600))):
            handler.reset_connection()  # stopped while hanging
            return None
        try:
            content, finish = self._generate(body, float(rule.get("seconds", 3600)) if hold else None)
        except _Stopped:
            handler.reset_connection()
            return None
        except Exception as exc:  # a broken responder should show up as a 500, not a dropped connection
            handler.send_json(500, _error(500, f"responder failed: {exc!r}"))
            return 500
        if kind == "invalid_json":
            content = '{"answer": '
        elif kind == "truncate":
            content, finish = content[: len(content) // 2], "length"
        elif kind == "empty":
            content = ""
        elif kind == "chatty":
            content = CHATTY_PREFIX + content.replace("{", "(")
        prompt_tokens = max(1, len(_message_text(body["messages"]).split()))
        completion_tokens = len(content.split())
        handler.send_json(200, {
            "id": f"chatcmpl-fake-{next(self._ids)}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, limits)
        return 200

    def _generate(self, body: dict[str, Any], stall: float | None = None) -> tuple[str, str]:
        """Deterministic content for the request, produced while holding one of the slots; `stall`: hold the
        slot that many seconds first, whether or not the client is still there (a wedged server)."""
        with self._slots or nullcontext():
            with self._lock:
                self._active += 1
                self.max_concurrency_seen = max(self.max_concurrency_seen, self._active)
            try:
                if stall is not None and self._stopping.wait(stall):
                    raise _Stopped
                if self.latency:
                    self._stopping.wait(self.latency)
                return self._content(body)
            finally:
                with self._lock:
                    self._active -= 1

    def _content(self, body: dict[str, Any]) -> tuple[str, str]:
        limit = _max_tokens(body)
        seed = _sha([body.get("model"), body["messages"], body.get("temperature"), limit])
        rng = random.Random(int(seed, 16))
        content = self.responder(body) if self.responder else None
        if content is None:
            rf = body.get("response_format") if isinstance(body.get("response_format"), dict) else {}
            schema = _schema_of(rf)
            if schema is not None:
                content = json.dumps(schema_instance(schema, rng))
            elif rf.get("type") in ("json_object", "json_schema"):
                content = json.dumps({"text": _sentence(rng)})
            else:
                content = " ".join(_sentence(rng) for _ in range(rng.randint(2, 3)))
        words = content.split()
        if limit is not None and len(words) > limit:  # what a real server does at max_tokens
            return " ".join(words[:limit]), "length"
        return content, "stop"


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_tokens", body.get("max_completion_tokens"))
    return int(value) if isinstance(value, int | float) else None


def main(argv: list[str] | None = None) -> None:
    """Run the fake server in the foreground (for benchmarks and manual poking with curl)."""
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible LLM server on loopback.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds slept per request")
    parser.add_argument("--slots", type=int, default=None, help="requests processed at once")
    parser.add_argument("--max-inflight", type=int, default=None, help="answer 429 above this many in flight")
    parser.add_argument("--rpm", type=int, default=None, help="state and enforce a requests-per-minute limit")
    parser.add_argument("--keep-bodies", action="store_true", help="log request bodies (GET /_log)")
    parser.add_argument("--seed", type=int, default=0, help="fixes which requests a fault rule's `rate` picks")
    parser.add_argument("--codeclm-text", action="store_true", help="answer CodecLM prompts sent without a "
                        "response_format in their plain-text form (see `codeclm_text`)")
    args = parser.parse_args(argv)
    with FakeLLMServer(latency=args.latency, slots=args.slots, host=args.host, port=args.port,
                       responder=codeclm_text if args.codeclm_text else None,
                       max_inflight=args.max_inflight, rpm=args.rpm, keep_bodies=args.keep_bodies,
                       seed=args.seed) as server:
        print(server.url, flush=True)
        with suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
