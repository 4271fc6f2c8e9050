"""The LLM gateway against the fake server over a real socket: attempt counts, Retry-After, timeouts, parsing,
caching, tokens and cost, plain-text formats, preflight (reliability F2-F5, F8, D5, D7). No Prefect here."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import settings_for
from pydantic import BaseModel

from codeclm.errors import ModelError
from codeclm.llm.breaker import breaker_for
from codeclm.llm.endpoints import preflight
from codeclm.llm.gateway import Call, Gateway, Reply, Result
from codeclm.llm.prompts import load_prompt
from codeclm.testing.fake_llm import FakeLLMServer
from tasks.decode import Instructions
from tasks.decode import _from_text as instructions_from_text
from tasks.encode import EncodedMetadata
from tasks.encode import _from_text as metadata_from_text
from tasks.improve import Improved
from tasks.improve import _from_text as improved_from_text
from tasks.score import ScorePair
from tasks.score import _from_text as scores_from_text


class Answer(BaseModel):
    answer: str


def _call(text: str = "hello", output: type[BaseModel] | None = Answer, role: str = "strong", **kw: Any) -> Call:
    kw.setdefault("reply", Reply.TEXT if output is None else Reply.STRUCTURED)
    return Call(role=role, messages=[{"role": "user", "content": text}], output=output, prompt_version="test",
                stage="test", item_id=text, **kw)


def _run_one(gateway: Gateway, call: Call) -> Result:
    (result,) = gateway.run([call])
    return result


def _gateway(server: FakeLLMServer, tmp_path: Path, **overrides: Any) -> Gateway:
    return Gateway(settings_for(server, tmp_path, **overrides))


def _logged(server: FakeLLMServer, at_least: int) -> list[dict[str, Any]]:
    """The server's request log once it holds `at_least` entries: the server logs a request after sending its
    response, so the client can be done a moment before the entry appears."""
    deadline = time.monotonic() + 5
    while len(server.requests) < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # room for an entry too many to show up
    return server.requests


def _statuses(server: FakeLLMServer, expected: int) -> list[int | None]:
    return [r["status"] for r in _logged(server, expected)]


# --- attempt accounting (F2, F3) ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [1, 3, 4])
def test_always_429_makes_exactly_max_attempts_requests(fake_llm: FakeLLMServer, tmp_path: Path,
                                                        max_attempts: int) -> None:
    fake_llm.set_faults([{"kind": "http", "status": 429}])
    result = _run_one(_gateway(fake_llm, tmp_path, max_attempts=max_attempts, parse_attempts=3), _call())
    assert not result.ok and result.error_type == "RateLimitError"
    assert result.attempts == max_attempts
    assert _statuses(fake_llm, max_attempts) == [429] * max_attempts  # never 7: no SDK retries stacked on ours


def test_transient_faults_recover_within_the_budget(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.set_faults([{"kind": "http", "status": 503, "times": 1}, {"kind": "reset", "times": 1},
                         {"kind": "http", "status": 429, "times": 1}])
    result = _run_one(_gateway(fake_llm, tmp_path, max_attempts=4), _call())
    assert result.ok and result.attempts == 4
    assert _statuses(fake_llm, 4) == [503, None, 429, 200]


CONTEXT_400 = {"error": {"message": "This model's maximum context length is 128 tokens. However, your messages "
                                    "resulted in 4000 tokens.", "type": "invalid_request_error",
                         "param": "messages", "code": "context_length_exceeded"}}


@pytest.mark.parametrize(("fault", "error_type"), [
    ({"kind": "http", "status": 400}, "BadRequestError"),
    ({"kind": "http", "status": 400, "body": CONTEXT_400}, "ContextWindowExceededError"),
    ({"kind": "http", "status": 422}, None),
], ids=["400", "context-length", "422"])
def test_non_transient_errors_fail_after_one_attempt(fake_llm: FakeLLMServer, tmp_path: Path,
                                                     fault: dict[str, Any], error_type: str | None) -> None:
    fake_llm.set_faults([fault])
    result = _run_one(_gateway(fake_llm, tmp_path, max_attempts=4, parse_attempts=3), _call())
    assert not result.ok and result.attempts == 1
    if error_type:
        assert result.error_type == error_type
    # litellm (drop_params) re-sends a 422 once without optional params; our layer adds nothing on top
    expected = 2 if fault["status"] == 422 else 1
    assert len(_logged(fake_llm, expected)) == expected


@pytest.mark.parametrize(("status", "words"), [(401, "authentication failed"), (403, "authentication failed"),
                                               (404, "not found")])
def test_auth_and_missing_model_stop_the_run(fake_llm: FakeLLMServer, tmp_path: Path, status: int,
                                             words: str) -> None:
    fake_llm.set_faults([{"kind": "http", "status": status}])
    with pytest.raises(ModelError, match=words) as info:
        _gateway(fake_llm, tmp_path, max_attempts=4).run([_call()])
    assert "\n" not in str(info.value)
    assert len(_logged(fake_llm, 1)) == 1


# --- Retry-After (F4) and hangs (F5) -----------------------------------------------------------------------


def test_retry_after_is_honoured(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.set_faults([{"kind": "http", "status": 429, "retry_after": 2, "times": 1}])
    result = _run_one(_gateway(fake_llm, tmp_path, backoff_base=0.0), _call())
    assert result.ok and result.attempts == 2
    first, second = _logged(fake_llm, 2)
    assert 2.0 <= second["t"] - first["t_end"] <= 2.5


def test_retry_after_ms_is_honoured(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.set_faults([{"kind": "http", "status": 503, "retry_after_ms": 700, "times": 1}])
    result = _run_one(_gateway(fake_llm, tmp_path, backoff_base=0.0), _call())
    assert result.ok
    first, second = _logged(fake_llm, 2)
    assert 0.7 <= second["t"] - first["t_end"] <= 1.2


def test_retry_after_above_the_cap_fails_at_once(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.set_faults([{"kind": "http", "status": 429, "retry_after": 600}])
    gateway = _gateway(fake_llm, tmp_path, retry_after_cap=30, max_attempts=4)
    _run_one(gateway, _call("warm-up", output=None, role="target"))  # pays litellm's import outside the timing
    started = time.monotonic()
    result = _run_one(gateway, _call())
    assert time.monotonic() - started < 1.5
    assert not result.ok and result.attempts == 1 and "retry_after_cap" in result.message
    assert [r["status"] for r in _logged(fake_llm, 2) if r["model"] == "fake-strong"] == [429]


def test_hang_is_cut_by_the_timeout_and_retried(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.set_faults([{"kind": "hang", "seconds": 2, "match": "hang here"}])
    gateway = _gateway(fake_llm, tmp_path, timeout=0.4, max_attempts=3, parse_attempts=2, backoff_base=0.05,
                       backoff_max=0.1)
    _run_one(gateway, _call("warm-up"))
    started = time.monotonic()
    result = _run_one(gateway, _call("hang here"))
    elapsed = time.monotonic() - started
    assert not result.ok and result.error_type == "Timeout" and result.attempts == 3
    assert 3 * 0.4 <= elapsed <= 3 * 0.4 + 2 * 0.15 + 1.0  # timeout x attempts + backoff, never the 6,000 s default
    assert [r["fault"] for r in _logged(fake_llm, 4)].count("hang") == 3  # hung requests log when they end


def test_a_hung_request_gets_a_second_copy_and_the_first_answer_wins(fake_llm: FakeLLMServer,
                                                                      tmp_path: Path) -> None:
    fake_llm.set_faults([{"kind": "hang", "seconds": 30, "match": "hang once", "times": 1}])
    gateway = _gateway(fake_llm, tmp_path, timeout=6.0, hedge_min_s=0.3)  # one answer: hedge at 3x its latency
    _run_one(gateway, _call("warm-up"))
    started = time.monotonic()
    result = _run_one(gateway, _call("hang once"))
    elapsed = time.monotonic() - started
    assert result.ok and result.attempts == 2  # the hung request and its copy, no retry
    assert 0.3 <= elapsed < 4.0  # hedged after 0.3 s (more on a busy machine), long before the 6 s timeout
    stats = gateway.limiter(gateway.endpoint("strong")).snapshot()
    assert stats.hedges == 1 and stats.in_flight == 0  # the abandoned request gave its slot back


def test_a_copy_that_hangs_too_gets_another_copy_before_the_timeout(fake_llm: FakeLLMServer,
                                                                    tmp_path: Path) -> None:
    fake_llm.set_faults([{"kind": "hang", "seconds": 30, "match": "hang twice", "times": 2}])
    gateway = _gateway(fake_llm, tmp_path, timeout=4.0, hedge_min_s=1.0)  # quick answers: copies at 1 s, 3 s
    _run_one(gateway, _call("warm-up"))
    started = time.monotonic()
    result = _run_one(gateway, _call("hang twice"))
    assert result.ok and result.attempts == 3  # the hung request, its hung copy and a third copy, no retry
    sent = [r["t"] - started for r in _logged(fake_llm, 2) if r["fault"] is None][-1]  # hung ones log at stop
    assert 3.0 <= sent < 4.0  # the third copy went out before the 4 s timeout (then a retry) would have
    assert gateway.limiter(gateway.endpoint("strong")).snapshot().hedges == 2


def test_the_first_calls_are_hedged_as_soon_as_the_first_answers_tell_the_latency(fake_llm: FakeLLMServer,
                                                                                   tmp_path: Path) -> None:
    """A stage's first calls go out before any latency is known (hedge after a quarter of the timeout, 10 s
    here); once the others are answered in milliseconds, the hung one is hedged at once, not 10 s later."""
    fake_llm.set_faults([{"kind": "hang", "seconds": 30, "match": "hang once", "times": 1}])
    gateway = _gateway(fake_llm, tmp_path, timeout=40.0, hedge_min_s=0.3)
    started = time.monotonic()
    results = gateway.run([_call("hang once"), *(_call(f"quick {i}") for i in range(5))])
    elapsed = time.monotonic() - started
    assert all(r.ok for r in results) and results[0].attempts == 2  # the hung request and one copy
    assert elapsed < 5.0  # not the 10 s of the first guess


def test_a_retry_goes_before_the_first_requests_waiting(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """One slot, eleven calls; the first call's request draws a 500: its retry is served before the ten fresh
    calls still waiting (its chain has waited once already), not after all of them."""
    fake_llm.latency = 0.05
    fake_llm.set_faults([{"kind": "http", "status": 500, "match": "first", "times": 1}])
    gateway = _gateway(fake_llm, tmp_path, max_concurrency=1, backoff_base=0.02, backoff_max=0.02)
    results = gateway.run([_call("first"), *(_call(f"fresh {i}") for i in range(10))])
    assert all(r.ok for r in results)
    answered = [r["messages_sha"] for r in sorted(_logged(fake_llm, 12), key=lambda r: r["t"]) if r["status"] == 200]
    first = next(r["messages_sha"] for r in fake_llm.requests if r["status"] == 500)
    assert answered.index(first) <= 3  # at most the requests sent during its backoff went first


def test_no_hedge_when_switched_off(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.set_faults([{"kind": "hang", "seconds": 30, "match": "hang once", "times": 1}])
    gateway = _gateway(fake_llm, tmp_path, timeout=1.0, hedge=False, hedge_min_s=0.1, max_attempts=2)
    result = _run_one(gateway, _call("hang once"))
    assert result.ok and result.attempts == 2 and result.error_type == ""  # timed out, then retried
    assert gateway.limiter(gateway.endpoint("strong")).snapshot().hedges == 0


def test_the_call_deadline_covers_all_attempts(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.set_faults([{"kind": "http", "status": 503}])
    gateway = _gateway(fake_llm, tmp_path, max_attempts=20, backoff_base=0.4, backoff_max=0.4, call_deadline=1.0)
    started = time.monotonic()
    result = _run_one(gateway, _call())
    elapsed = time.monotonic() - started
    assert not result.ok and result.error_type == "DeadlineExceeded"
    assert "call_deadline (1s)" in result.message and "ServiceUnavailable" in result.message  # says why
    assert elapsed < 1.5 and 2 <= result.attempts < 20


def test_an_endpoint_down_for_a_while_pauses_its_calls_and_resumes(fake_llm: FakeLLMServer,
                                                                   tmp_path: Path) -> None:
    gateway = _gateway(fake_llm, tmp_path, max_attempts=2, breaker_failures=3, breaker_probe_s=0.3)
    _run_one(gateway, _call("warm-up"))
    fake_llm.stop()
    restart = threading.Timer(2.0, fake_llm.start)  # same port: down for two seconds
    restart.start()
    try:
        results = gateway.run([_call(f"while down {i}") for i in range(12)])
    finally:
        restart.join()
    assert all(r.ok for r in results), [r.message for r in results if not r.ok]
    assert breaker_for(gateway.endpoint("strong").identity).openings == 1


def test_an_endpoint_down_too_long_stops_the_run_with_one_line(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    gateway = _gateway(fake_llm, tmp_path, breaker_failures=2, breaker_probe_s=0.2, breaker_stop_after=1.0)
    _run_one(gateway, _call("warm-up"))
    fake_llm.stop()
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"unreachable for \d+s \(breaker_stop_after = 1s\); stopping: completed "
                       "calls are kept"):
        gateway.run([_call(f"while down {i}") for i in range(4)])
    assert time.monotonic() - started < 5


# --- structured output (F8) --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "error_type", "raw"), [
    ("invalid_json", "ParseError", '{"answer": '),
    ("empty", "ParseError", ""),
    ("truncate", "Truncated", None),
])
def test_bad_output_is_retried_then_failed_with_raw_text(fake_llm: FakeLLMServer, tmp_path: Path, kind: str,
                                                         error_type: str, raw: str | None) -> None:
    fake_llm.set_faults([{"kind": kind}])
    result = _run_one(_gateway(fake_llm, tmp_path, parse_attempts=3, max_attempts=4), _call())
    assert not result.ok and result.error_type == error_type and result.value is None
    assert len(_logged(fake_llm, 3)) == 3 and result.attempts == 3
    assert result.text is not None
    if raw is not None:
        assert result.text == raw
    else:
        assert result.text and not result.text.rstrip().endswith("}")  # half a JSON object, kept for diagnosis


@pytest.mark.parametrize("content", ['{"answer": 5}', '{"other": "x"}', "[1, 2]", "not json at all"])
def test_schema_violations_are_parse_failures(fake_llm: FakeLLMServer, tmp_path: Path, content: str) -> None:
    fake_llm.responder = lambda body: content
    result = _run_one(_gateway(fake_llm, tmp_path, parse_attempts=2), _call())
    assert not result.ok and result.error_type == "ParseError" and result.text == content
    assert len(_logged(fake_llm, 2)) == 2


def test_fenced_json_is_accepted(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.responder = lambda body: '```json\n{"answer": "fenced"}\n```'
    result = _run_one(_gateway(fake_llm, tmp_path), _call())
    assert result.ok and result.value == Answer(answer="fenced")


def test_a_parse_failure_recovers_on_the_next_call(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.set_faults([{"kind": "invalid_json", "times": 1}])
    result = _run_one(_gateway(fake_llm, tmp_path, parse_attempts=3), _call())
    assert result.ok and isinstance(result.value, Answer) and result.attempts == 2


# --- cache (D5) --------------------------------------------------------------------------------------------


def test_failures_are_never_cached(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    settings = settings_for(fake_llm, tmp_path, max_attempts=1, parse_attempts=1)
    fake_llm.set_faults([{"kind": "http", "status": 500}])
    assert not _run_one(Gateway(settings), _call()).ok
    fake_llm.set_faults([{"kind": "invalid_json"}])
    assert not _run_one(Gateway(settings), _call()).ok
    assert not list(settings.cache_dir.rglob("*.json"))
    fake_llm.set_faults([])
    result = _run_one(Gateway(settings), _call())
    assert result.ok and not result.cached
    assert _statuses(fake_llm, 3) == [500, 200, 200]


def test_the_same_bad_answer_at_temperature_0_is_kept_and_a_rerun_reports_it_without_a_request(
        fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """A failure a new identical request cannot change (temperature 0, the same unparseable answer twice) is kept
    in the call cache: a rerun reports it from there; `retry_failed` asks again and keeps a good answer."""
    settings = settings_for(fake_llm, tmp_path, temperature=0.0, parse_attempts=3)
    fake_llm.responder = lambda body: '{"answer": 7'  # what a deterministic model would give every time
    first = _run_one(Gateway(settings), _call())
    assert not first.ok and first.error_type == "ParseError" and first.attempts == 2  # stopped at the repeat
    assert "--retry-failed asks again" in first.message and len(_logged(fake_llm, 2)) == 2
    (entry,) = [json.loads(p.read_text()) for p in settings.cache_dir.rglob("*.json")]
    assert entry["failed"] is True and entry["text"] == '{"answer": 7'

    again = _run_one(Gateway(settings), _call())  # a rerun, as a new process
    assert not again.ok and again.cached and again.attempts == 0 and again.error_type == "ParseError"
    assert again.text == '{"answer": 7' and "kept: at temperature 0" in again.message
    assert len(_logged(fake_llm, 2)) == 2  # no request

    fake_llm.responder = None
    retried = _run_one(Gateway(settings.model_copy(update={"retry_failed": True})), _call())
    assert retried.ok and not retried.cached and len(_logged(fake_llm, 3)) == 3
    assert _run_one(Gateway(settings), _call()).cached  # the good answer replaced the kept failure


@pytest.mark.parametrize("case", ["sampled", "varying", "http_500", "timeout"])
def test_failures_that_a_new_request_may_change_are_never_kept(fake_llm: FakeLLMServer, tmp_path: Path,
                                                               case: str) -> None:
    """Sampled answers, answers that differ between attempts, 5xx and timeouts: a rerun asks again."""
    settings = settings_for(fake_llm, tmp_path, temperature=0.7 if case == "sampled" else 0.0, parse_attempts=3,
                            max_attempts=2, timeout=0.5, hedge=False)
    answers = iter(range(100))
    if case in ("sampled", "varying"):
        fake_llm.responder = lambda body: "not json" if case == "sampled" else f"not json {next(answers)}"
    else:
        fake_llm.set_faults([{"kind": "http", "status": 500} if case == "http_500" else {"kind": "hang"}])
    assert not _run_one(Gateway(settings), _call()).ok
    assert not list(settings.cache_dir.rglob("*.json"))
    again = _run_one(Gateway(settings), _call())  # a rerun, as a new process: it asks again
    assert not again.ok and not again.cached and again.attempts > 0


def test_a_kept_failure_that_the_parser_now_reads_is_an_answer(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """A judge's '0.9 8' kept as failed by an older score rule is read by the current one, without a request."""
    settings = settings_for(fake_llm, tmp_path, temperature=0.0)
    gateway = Gateway(settings)
    call = _call("judge this", output=ScorePair, reply=Reply.FREE_TEXT, text_parser=scores_from_text)
    gateway.cache.put(gateway.key(call), {"failed": True, "text": "0.9 8", "error_type": "ParseError",
                                          "message": "scores 0.9 8 are outside 1-10"})
    result = _run_one(gateway, call)
    assert result.ok and result.cached and result.value == ScorePair(score_1=1, score_2=8)
    assert fake_llm.requests == []


def test_success_is_cached_on_disk_for_a_new_gateway(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    settings = settings_for(fake_llm, tmp_path)
    calls = [_call(f"question {i}") for i in range(5)]
    first = Gateway(settings).run(calls)
    assert all(r.ok and not r.cached for r in first) and len(_logged(fake_llm, 5)) == 5
    again = Gateway(settings).run(calls)  # as a new process would: nothing shared but the home directory
    assert len(_logged(fake_llm, 5)) == 5
    assert all(r.ok and r.cached for r in again)
    assert [r.value for r in again] == [r.value for r in first]


def test_unreadable_cache_entry_is_a_miss(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    settings = settings_for(fake_llm, tmp_path)
    gateway = Gateway(settings)
    _run_one(gateway, _call())
    (entry,) = settings.cache_dir.rglob("*.json")
    entry.write_text('{"text": "trunc')  # a torn write, as after a crash on a filesystem without atomic rename
    result = _run_one(Gateway(settings), _call())
    assert result.ok and not result.cached and len(_logged(fake_llm, 2)) == 2
    assert json.loads(entry.read_text())["text"] == result.text  # and the entry is repaired


# --- tokens and cost (D7) ----------------------------------------------------------------------------------


def test_tokens_are_the_servers_usage_summed_and_unpriced_cost_is_zero(fake_llm: FakeLLMServer,
                                                                       tmp_path: Path) -> None:
    fake_llm.responder = lambda body: "one two three four five"
    fake_llm.set_faults([{"kind": "empty", "times": 1}])  # a first answer that fails still used tokens
    result = _run_one(_gateway(fake_llm, tmp_path, parse_attempts=2), _call("alpha beta gamma", output=None))
    assert result.ok and result.value == "one two three four five"
    assert result.prompt_tokens == 3 + 3  # the fake server counts words of the prompt, per response
    assert result.completion_tokens == 0 + 5
    assert result.cost_usd == 0.0 and result.unpriced


# --- concurrency -------------------------------------------------------------------------------------------


def test_requests_in_flight_stay_within_the_role_limit(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.latency = 0.1
    results = _gateway(fake_llm, tmp_path, max_concurrency=3).run([_call(f"q{i}") for i in range(12)])
    assert all(r.ok for r in results)
    assert fake_llm.max_concurrency_seen == 3
    assert [r.call.item_id for r in results] == [f"q{i}" for i in range(12)]  # results keep the calls' order


# --- plain-text mode: the paper's formats ------------------------------------------------------------------


def _paper_formats(body: dict[str, Any]) -> str:
    """Answers in the plain-text formats the paper's prompts ask for, decorated like real models do."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    assert "response_format" not in body
    if "analyse instructions" in system:
        return "**Use case:** Creative writing\n**Skills:** poetry, rhyme schemes, humour"
    if "write instructions" in system:
        return "Here you go:\n1. Write a sonnet about tea.\n2) Compose a limerick on Mondays.\n3. Draft an ode."
    if "improve instructions" in system:
        return "Improved instruction: Write a sonnet about tea using only iambic pentameter."
    if "quality of an answer" in system:
        return "8 6"
    raise AssertionError(f"unexpected prompt: {user[:80]}")


@pytest.mark.parametrize(("prompt", "values", "output", "parser", "expected"), [
    ("encode", {"instruction": "Write a poem.", "max_skills": 3}, EncodedMetadata, metadata_from_text,
     EncodedMetadata(use_case="Creative writing", skills=["poetry", "rhyme schemes", "humour"])),
    ("decode", {"n": 3, "use_case": "creative writing", "skills": "poetry"}, Instructions, instructions_from_text,
     Instructions(instructions=["Write a sonnet about tea.", "Compose a limerick on Mondays.", "Draft an ode."])),
    ("improve", {"action": "add a constraint", "instruction": "Write a sonnet."}, Improved, improved_from_text,
     Improved(improved_instruction="Write a sonnet about tea using only iambic pentameter.")),
    ("score", {"question": "q", "answer_1": "a", "answer_2": "b"}, ScorePair, scores_from_text,
     ScorePair(score_1=8, score_2=6)),
])
def test_plain_text_mode_parses_the_paper_formats(fake_llm: FakeLLMServer, tmp_path: Path, prompt: str,
                                                  values: dict[str, Any], output: type[BaseModel], parser: Any,
                                                  expected: BaseModel) -> None:
    fake_llm.responder = _paper_formats
    template = load_prompt(prompt)
    call = Call(role="strong", messages=template.render(structured=False, **values), output=output, text_parser=parser,
                prompt_version=template.version, stage=prompt, item_id="x")
    result = _run_one(_gateway(fake_llm, tmp_path, output_mode="text"), call)
    assert result.ok, result.message
    assert result.value == expected
    assert _logged(fake_llm, 1)[0]["response_format"] is None


def test_text_mode_without_a_text_parser_fails_cleanly(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    result = _run_one(_gateway(fake_llm, tmp_path, output_mode="text", parse_attempts=1), _call())
    assert not result.ok and result.error_type == "ParseError"


# --- preflight ---------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_preflight_with_one_line(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    settings = settings_for(fake_llm, tmp_path)
    preflight(settings, ["strong", "target"])  # the running fake server passes
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    settings.target.api_base = dead
    with pytest.raises(ModelError) as info:
        preflight(settings, ["strong", "target"])
    message = str(info.value)
    assert "\n" not in message and dead in message and re.match(r"^target endpoint .* unreachable", message)


def test_missing_api_key_fails_preflight(fake_llm: FakeLLMServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODECLM_TEST_UNSET_KEY", raising=False)
    settings = settings_for(fake_llm, tmp_path, api_key_env="CODECLM_TEST_UNSET_KEY")
    with pytest.raises(ModelError, match="CODECLM_TEST_UNSET_KEY is not set"):
        preflight(settings, ["strong"])
    assert fake_llm.requests == []
