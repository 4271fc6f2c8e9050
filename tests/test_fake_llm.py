"""The fake LLM server behaves like a real OpenAI-compatible endpoint, over a real socket, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from codeclm.testing.fake_llm import CHATTY_PREFIX, FakeLLMServer, codeclm_text

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parents[1]


class Step(BaseModel):
    title: str
    minutes: int = Field(ge=1, le=120)


class Recipe(BaseModel):
    name: str = Field(max_length=40)
    difficulty: Literal["easy", "medium", "hard"]
    score: float = Field(ge=1, le=10)
    tags: list[str]
    steps: list[Step] = Field(min_length=1, max_length=5)
    vegetarian: bool
    note: str | None = None


SCHEMA = Recipe.model_json_schema()
USER = [{"role": "user", "content": "Write a recipe for soup."}]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


def chat(server: FakeLLMServer, timeout: float = 5.0, **body: Any) -> httpx.Response:
    body.setdefault("model", "fake-strong")
    body.setdefault("messages", USER)
    headers = {"Authorization": "Bearer sk-secret", "api-key": "also-secret"}
    return httpx.post(f"{server.url}/chat/completions", json=body, headers=headers, timeout=timeout)


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_json_schema_response_validates_against_pydantic_schema(server: FakeLLMServer) -> None:
    assert "$defs" in SCHEMA  # the nested model arrives as $defs + $ref, as pydantic v2 emits it
    rf = {"type": "json_schema", "json_schema": {"name": "Recipe", "schema": SCHEMA, "strict": True}}
    for i in range(5):
        messages = [{"role": "user", "content": f"recipe number {i}"}]
        instance = json.loads(content(chat(server, messages=messages, response_format=rf)))
        jsonschema.validate(instance, SCHEMA)
        recipe = Recipe.model_validate(instance)
        assert 1 <= recipe.score <= 10 and 1 <= len(recipe.steps) <= 5


def test_llama_cpp_json_object_with_schema_validates(server: FakeLLMServer) -> None:
    response = chat(server, response_format={"type": "json_object", "schema": SCHEMA})
    jsonschema.validate(json.loads(content(response)), SCHEMA)
    assert server.requests[-1]["response_format"] == "json_object"


def test_json_object_without_schema_returns_text_object(server: FakeLLMServer) -> None:
    instance = json.loads(content(chat(server, response_format={"type": "json_object"})))
    assert list(instance) == ["text"] and len(instance["text"].split()) >= 4


def test_output_is_deterministic_per_request(server: FakeLLMServer) -> None:
    rf = {"type": "json_object", "schema": SCHEMA}
    first = content(chat(server, response_format=rf))
    assert content(chat(server, response_format=rf)) == first
    assert content(chat(server, response_format=rf, messages=[{"role": "user", "content": "other"}])) != first
    assert content(chat(server)) == content(chat(server))
    assert content(chat(server, temperature=0.2)) != content(chat(server, temperature=0.9))


def test_plain_text_completion_shape_and_usage(server: FakeLLMServer) -> None:
    body = chat(server, model="some-model").json()
    assert body["object"] == "chat.completion" and body["model"] == "some-model"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    text = choice["message"]["content"]
    assert 2 <= text.count(".") <= 3 and not text.startswith("{")
    usage = body["usage"]
    assert usage["prompt_tokens"] == 5  # "Write a recipe for soup."
    assert usage["completion_tokens"] == len(text.split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_truncates_with_finish_reason_length(server: FakeLLMServer) -> None:
    body = chat(server, max_tokens=3).json()
    assert len(body["choices"][0]["message"]["content"].split()) == 3
    assert body["choices"][0]["finish_reason"] == "length"
    assert server.requests[-1]["max_tokens"] == 3


def test_responder_overrides_content_and_none_falls_back() -> None:
    seen: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> str | None:
        seen.append(body)
        return "custom answer" if "custom" in body["messages"][-1]["content"] else None

    with FakeLLMServer(responder=responder) as srv:
        assert content(chat(srv, messages=[{"role": "user", "content": "custom please"}])) == "custom answer"
        assert content(chat(srv)) != "custom answer"
    assert seen[0]["model"] == "fake-strong" and len(seen) == 2


def test_http_429_fault_sends_retry_after_and_openai_error(server: FakeLLMServer) -> None:
    server.set_faults([{"kind": "http", "status": 429, "retry_after": "2", "retry_after_ms": "1500"}])
    response = chat(server)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2" and response.headers["retry-after-ms"] == "1500"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert server.requests[-1]["status"] == 429 and server.requests[-1]["fault"] == "http"


def test_times_limits_a_rule_then_requests_succeed(server: FakeLLMServer) -> None:
    server.set_faults([{"kind": "http", "status": 503, "times": 2}])
    assert [chat(server).status_code for _ in range(4)] == [503, 503, 200, 200]


def test_match_selects_by_message_text_or_model(server: FakeLLMServer) -> None:
    too_long = {"error": {"message": "This model's maximum context length is 2048 tokens.",
                          "code": "context_length_exceeded"}}  # fmt: skip
    server.set_faults([
        {"kind": "http", "status": 400, "match": "HUGE", "body": too_long},
        {"kind": "empty", "match": "fake-weak"},
    ])  # fmt: skip
    response = chat(server, messages=[{"role": "user", "content": "a HUGE prompt"}])
    assert response.status_code == 400 and response.json() == too_long
    assert content(chat(server, model="fake-weak")) == ""
    assert content(chat(server)) != ""


def test_hang_fault_times_out_the_client(server: FakeLLMServer) -> None:
    server.set_faults([{"kind": "hang", "seconds": 0.6, "times": 1}])
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        chat(server, timeout=0.2)
    assert time.monotonic() - started < 0.5
    assert chat(server).status_code == 200


def test_stop_returns_promptly_while_a_request_hangs() -> None:
    srv = FakeLLMServer().start()
    srv.set_faults([{"kind": "hang"}])  # default: an hour
    errors: list[Exception] = []

    def call() -> None:
        try:
            chat(srv, timeout=30)
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 1.0
    thread.join(timeout=5)
    assert not thread.is_alive() and len(errors) == 1


def test_rate_faults_are_fixed_by_seed_and_request_not_by_arrival_order() -> None:
    """Which requests a `rate` rule picks depends on the seed and the request (and how often it came), so a
    concurrent run sees the same faults in any order, and a retry of a faulted request draws anew."""
    def faulted(seed: int, order: list[int]) -> set[tuple[int, int]]:
        with FakeLLMServer(seed=seed) as srv:
            srv.set_faults([{"kind": "http", "status": 500, "rate": 0.3}])
            hits = set()
            for i in order:
                for arrival in (1, 2):
                    if chat(srv, messages=[{"role": "user", "content": f"q{i}"}]).status_code == 500:
                        hits.add((i, arrival))
            return hits

    forward = faulted(7, list(range(40)))
    assert forward == faulted(7, list(reversed(range(40))))
    assert forward != faulted(8, list(range(40)))
    assert 10 <= len(forward) <= 40  # about 30 % of 80
    assert {i for i, arrival in forward if arrival == 1} != {i for i, arrival in forward if arrival == 2}


def test_outage_refuses_connections_then_serves_on_the_same_port(server: FakeLLMServer) -> None:
    url = server.url
    restart = server.outage(0.5)
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{url}/chat/completions", json={"model": "m", "messages": USER}, timeout=2)
    restart.join()
    assert server.url == url and content(chat(server))


def test_reset_fault_raises_connection_error(server: FakeLLMServer) -> None:
    server.set_faults([{"kind": "reset", "times": 1}])
    with pytest.raises(httpx.TransportError) as info:
        chat(server)
    assert not isinstance(info.value, httpx.TimeoutException)
    assert server.requests[-1]["status"] is None and server.requests[-1]["fault"] == "reset"
    assert chat(server).status_code == 200


def test_truncate_invalid_json_and_empty_faults(server: FakeLLMServer) -> None:
    rf = {"type": "json_object", "schema": SCHEMA}
    full = content(chat(server, response_format=rf))
    server.set_faults([{"kind": "truncate"}])
    body = chat(server, response_format=rf).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == full[: len(full) // 2]
    server.set_faults([{"kind": "invalid_json"}])
    with pytest.raises(json.JSONDecodeError):
        json.loads(content(chat(server, response_format=rf)))
    server.set_faults([{"kind": "empty"}])
    assert content(chat(server)) == ""


def test_chatty_fault_prefixes_the_answer_and_breaks_its_braces(server: FakeLLMServer) -> None:
    rf = {"type": "json_object", "schema": SCHEMA}
    full = content(chat(server, response_format=rf))
    server.set_faults([{"kind": "chatty"}])
    assert content(chat(server, response_format=rf)) == CHATTY_PREFIX + full.replace("{", "(")


def test_a_hang_that_holds_a_slot_keeps_others_waiting() -> None:
    """`hold_slot`: the stalled request takes one of the server's slots for its seconds, client there or not
    (a wedged server); a plain hang holds none."""
    with FakeLLMServer(slots=1) as srv:
        srv.set_faults([{"kind": "hang", "seconds": 1.0, "hold_slot": True, "times": 1}])
        with pytest.raises(httpx.ReadTimeout):
            chat(srv, timeout=0.2)  # stalls in the only slot, and the client leaves
        started = time.monotonic()
        assert chat(srv).status_code == 200
        assert time.monotonic() - started >= 0.6  # waited for the slot the stalled request kept
        srv.set_faults([{"kind": "hang", "seconds": 1.0, "times": 1}])
        with pytest.raises(httpx.ReadTimeout):
            chat(srv, timeout=0.2)
        started = time.monotonic()
        assert chat(srv).status_code == 200 and time.monotonic() - started < 0.5


def test_the_plain_text_codeclm_model_answers_each_prompt_in_its_text_form() -> None:
    from codeclm.llm.parsing import (
        parse_improved_instruction,
        parse_metadata,
        parse_numbered_list,
        parse_rubrics_actions,
        parse_two_scores,
    )
    from codeclm.llm.prompts import load_prompt

    def ask(name: str, **values: Any) -> str:
        messages = load_prompt(name).render(structured=False, **values)
        return codeclm_text({"messages": messages}) or ""

    use_case, skills = parse_metadata(ask("encode", instruction="Explain tides.", max_skills=3))
    assert use_case and len(skills) == 2
    assert len(parse_numbered_list(ask("decode", n=4, use_case=use_case, skills=", ".join(skills)))) == 4
    rubrics, actions = parse_rubrics_actions(ask("rubrics", n=3, use_case=use_case, skills="x"), 3)
    assert len(rubrics) == len(actions) == 3
    assert parse_improved_instruction(ask("improve", action=actions[0], instruction="Explain tides."))
    assert all(1 <= s <= 10 for s in parse_two_scores(ask("score", question="q", answer_1="a", answer_2="b")))
    assert codeclm_text({"messages": [], "response_format": {"type": "json_object"}}) is None


def test_log_counts_requests_and_redacts_secrets(server: FakeLLMServer) -> None:
    for _ in range(3):
        chat(server, temperature=0.5)
    log = server.requests
    assert len(log) == 3
    entry = log[0]
    assert entry["headers"]["authorization"] == "<redacted>" and entry["headers"]["api-key"] == "<redacted>"
    assert "sk-secret" not in json.dumps(log)
    assert entry["model"] == "fake-strong" and entry["temperature"] == 0.5 and entry["status"] == 200
    assert entry["t_end"] >= entry["t"] and len(entry["messages_sha"]) == 64
    assert entry["path"] == "/v1/chat/completions"


def test_control_endpoints_over_http(server: FakeLLMServer) -> None:
    base = server.url.removesuffix("/v1")
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/models").json()["object"] == "list"
    rules = [{"kind": "http", "status": 500}]
    assert httpx.post(f"{base}/_faults", json=rules).status_code == 200
    assert chat(server).status_code == 500
    assert httpx.post(f"{base}/_faults", json=[{"kind": "nonsense"}]).status_code == 400
    plain = httpx.post(f"{base}/chat/completions", json={"model": "m", "messages": USER})
    assert plain.status_code == 500  # the rules from before the bad request are kept
    log = httpx.get(f"{base}/_log").json()
    assert [e["path"] for e in log] == ["/v1/chat/completions", "/chat/completions"]
    assert httpx.post(f"{base}/_reset").status_code == 200
    assert server.requests == [] and chat(server).status_code == 200


def test_slots_bound_concurrency() -> None:
    with FakeLLMServer(latency=0.3, slots=2) as srv:
        started = time.monotonic()
        threads = [threading.Thread(target=chat, args=(srv,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        assert elapsed >= 0.85, elapsed
        assert srv.max_concurrency_seen == 2
        assert [e["status"] for e in srv.requests] == [200] * 6


def test_cli_runs_in_foreground_and_prints_url() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "codeclm.testing.fake_llm", "--port", "0", "--latency", "0", "--slots", "4"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=5).json() == {"status": "ok"}
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def test_litellm_completion_against_fake_server(server: FakeLLMServer) -> None:
    import litellm

    schema = Step.model_json_schema()
    response = litellm.completion(
        model="openai/fake-strong", api_base=server.url, api_key="sk-test", messages=USER,
        response_format={"type": "json_object", "schema": schema}, timeout=10, max_retries=0,
    )  # fmt: skip
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)
    entry = server.requests[-1]
    assert entry["model"] == "fake-strong" and entry["response_format"] == "json_object"
    assert entry["headers"]["authorization"] == "<redacted>"

    server.set_faults([{"kind": "http", "status": 429, "retry_after": "0"}])
    with pytest.raises(litellm.RateLimitError):
        litellm.completion(
            model="openai/fake-strong", api_base=server.url, api_key="sk-test", messages=USER,
            timeout=10, max_retries=0,
        )  # fmt: skip
    assert len(server.requests) == 2  # max_retries=0: exactly one HTTP attempt on a 429
