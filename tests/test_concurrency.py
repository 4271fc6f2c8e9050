"""Adaptive concurrency (codeclm/llm/concurrency.py) through the gateway against the real loopback server: 429 storms
shrink the limit, successes grow it, Retry-After holds the whole endpoint, stated per-minute limits pace calls,
one limiter per endpoint whatever the Settings or Gateway, hung calls stop holding slots; nothing is lost."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import settings_for

from codeclm.llm import concurrency
from codeclm.llm.embedded import EMBEDDED_URL_ENV
from codeclm.llm.gateway import Call, Gateway, Reply, Result
from codeclm.testing.fake_llm import FakeLLMServer


def _calls(n: int, prefix: str = "q", role: str = "strong") -> list[Call]:
    return [Call(role=role, messages=[{"role": "user", "content": f"{prefix} {i}"}], output=None, reply=Reply.TEXT,
                 prompt_version="test", stage="test", item_id=f"{prefix}{i}") for i in range(n)]


def _gateway(server: FakeLLMServer, tmp_path: Path, **overrides: Any) -> Gateway:
    return Gateway(settings_for(server, tmp_path, **overrides))


def _stats(gateway: Gateway, role: str = "strong") -> concurrency.LimiterStats:
    return gateway.limiter(gateway.endpoint(role)).snapshot()


def _all_answered(results: list[Result], server: FakeLLMServer) -> None:
    """Nothing lost: every call succeeded, and the server answered each exactly once with a 200."""
    assert all(r.ok for r in results), [r.message for r in results if not r.ok][:3]
    assert sum(1 for r in server.requests if r["status"] == 200) == len(results)


def test_successes_grow_the_limit_to_the_ceiling(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.latency = 0.2
    gateway = _gateway(fake_llm, tmp_path, max_concurrency=40)
    results = gateway.run(_calls(200))
    _all_answered(results, fake_llm)
    stats = _stats(gateway)
    assert stats.limit == stats.max_limit == stats.ceiling == 40 > concurrency.START
    assert stats.decreases == 0 and stats.congestion == 0
    assert fake_llm.max_concurrency_seen > concurrency.START  # the server really saw more than the start
    assert "openai/fake-strong 40/40 (0 in flight)" in concurrency.progress_line()  # what the CLI shows


def test_a_429_storm_shrinks_the_limit_and_nothing_is_lost(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """A server that answers 429 above 4 requests in flight: the limit falls from 16 to about 4 and stays there,
    so the 429s are an early burst, not a steady share; every call still ends with its answer."""
    fake_llm.latency, fake_llm.max_inflight = 0.03, 4
    gateway = _gateway(fake_llm, tmp_path, max_concurrency=64, max_attempts=20)
    results = gateway.run(_calls(240))
    _all_answered(results, fake_llm)
    stats = _stats(gateway)
    assert stats.decreases >= 2 and stats.min_limit <= 5 and stats.limit <= 6
    statuses = [r["status"] for r in sorted(fake_llm.requests, key=lambda r: r["t"])]
    assert set(statuses) == {200, 429}
    first, last = statuses[:60], statuses[-120:]
    assert last.count(429) < first.count(429)
    assert last.count(429) / len(last) < 0.1


def test_a_steady_share_of_random_429s_is_not_overload(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """A large server that answers 10 % of requests with 429 whatever the load (no Retry-After): the share is
    the same with few requests in flight as with many, so after the first cuts (made before any share is
    known) the limit is no longer cut towards one slot; the 429s are retried and nothing is lost. (The
    single-window estimate this replaced: 13 cuts, down to 1 slot, on this test.)"""
    fake_llm.latency = 0.03
    fake_llm.set_faults([{"kind": "http", "status": 429, "rate": 0.10}])
    gateway = _gateway(fake_llm, tmp_path, max_concurrency=32, max_attempts=20)
    results = gateway.run(_calls(1000))
    _all_answered(results, fake_llm)
    stats = _stats(gateway)
    assert 0.06 < stats.congestion / stats.calls < 0.14  # the server really refused about 10 %
    assert stats.min_limit >= concurrency.START // 4  # floor: a few early cuts, no collapse
    assert stats.decreases <= 8  # against ~100 429s
    assert stats.limit >= concurrency.START // 2


def test_successes_after_a_storm_grow_the_limit_again(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.latency = 0.01
    fake_llm.set_faults([{"kind": "http", "status": 503, "times": 12}])
    gateway = _gateway(fake_llm, tmp_path, max_concurrency=32, max_attempts=10)
    results = gateway.run(_calls(400))
    _all_answered(results, fake_llm)
    stats = _stats(gateway)
    assert stats.decreases >= 1 and stats.min_limit < concurrency.START
    assert stats.limit > stats.min_limit  # additive increase after the cut


def test_retry_after_holds_every_request_to_the_endpoint(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.latency = 0.05
    fake_llm.set_faults([{"kind": "http", "status": 429, "retry_after": 1, "times": 1}])
    gateway = _gateway(fake_llm, tmp_path, max_concurrency=4)
    results = gateway.run(_calls(40))
    _all_answered(results, fake_llm)
    log = sorted(fake_llm.requests, key=lambda r: r["t"])
    (refused,) = [r for r in log if r["status"] == 429]
    later = [r["t"] for r in log if r["t"] > refused["t_end"] + 0.1]  # admitted after the client saw the 429
    assert later and min(later) >= refused["t_end"] + 1.0
    stats = _stats(gateway)
    assert stats.paused_s >= 1.0 and stats.decreases == 1 and stats.congestion == 1


def test_a_stated_requests_per_minute_limit_paces_calls(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """The server states 120 requests per minute in x-ratelimit-* headers and refuses more; the limiter reads
    the limit from the first answers and spaces the calls beyond the first 120, so none is refused."""
    fake_llm.rpm = 120
    fake_llm.reset()
    gateway = _gateway(fake_llm, tmp_path, max_concurrency=16)
    results = gateway.run(_calls(125))
    _all_answered(results, fake_llm)
    assert {r["status"] for r in fake_llm.requests} == {200}
    assert _stats(gateway).requests_per_minute == 120


def test_a_configured_requests_per_minute_limit_is_kept(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.rpm = 600  # states a higher limit than the configured one: the lower wins
    fake_llm.reset()
    gateway = _gateway(fake_llm, tmp_path, requests_per_minute=300)
    _all_answered(gateway.run(_calls(5)), fake_llm)
    assert _stats(gateway).requests_per_minute == 300


def test_one_limiter_per_endpoint_whatever_the_settings_or_gateway(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.latency = 0.05
    first = _gateway(fake_llm, tmp_path / "a", max_concurrency=3)
    second = _gateway(fake_llm, tmp_path / "b", max_concurrency=3)
    assert first.settings is not second.settings
    assert first.limiter(first.endpoint("strong")) is second.limiter(second.endpoint("strong"))
    results: dict[str, list[Result]] = {}
    threads = [threading.Thread(target=lambda g=g, n=n: results.__setitem__(n, g.run(_calls(15, n))))
               for g, n in ((first, "a"), (second, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for rs in results.values() for r in rs) and len(results) == 2
    assert fake_llm.max_concurrency_seen == 3  # two gateways, one endpoint: 3 in flight, not 6


def test_the_embedded_server_keeps_one_slot(fake_llm: FakeLLMServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EMBEDDED_URL_ENV, fake_llm.url)
    fake_llm.latency = 0.02
    gateway = _gateway(fake_llm, tmp_path, strong="embedded", max_concurrency=32)
    results = gateway.run(_calls(30, "embedded"))
    _all_answered(results, fake_llm)
    stats = _stats(gateway)
    assert stats.limit == stats.max_limit == stats.ceiling == 1
    assert fake_llm.max_concurrency_seen == 1


def test_a_hung_call_stops_holding_its_slot(fake_llm: FakeLLMServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One slot, and the first call hangs: after the straggler delay the others go ahead instead of waiting
    for the hung call's timeout."""
    monkeypatch.setattr(concurrency, "STRAGGLER_MIN_S", 0.3)
    monkeypatch.setattr(concurrency, "STRAGGLER_FACTOR", 1.0)
    fake_llm.set_faults([{"kind": "hang", "seconds": 3, "match": "hang here"}])
    gateway = _gateway(fake_llm, tmp_path, max_concurrency=1, timeout=10.0)
    calls = [*_calls(1, "hang here"), *_calls(10)]
    results = gateway.run(calls)
    assert all(r.ok for r in results)
    hung = next(r for r in fake_llm.requests if r["fault"] == "hang")
    others = [r for r in fake_llm.requests if r["fault"] is None]
    assert len(others) == 10 and max(r["t_end"] for r in others) < hung["t_end"]
    assert _stats(gateway).stragglers == 1
