"""Failure drills of issue #13 that concern what is kept on disk: a corrupted call-cache entry, a full disk
while publishing, and two refreshes started at once on one root. Each asserts that nothing is lost."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import settings_for
from pydantic import BaseModel

from codeclm.fake_llm import FakeLLMServer
from codeclm.gateway import Call
from tasks._base import Step


class Answer(BaseModel):
    answer: str


def _calls(n: int) -> list[Call]:
    return [Call(role="strong", messages=[{"role": "user", "content": f"question {i}"}], output=Answer,
                 prompt_version="drill", stage="drill", item_id=f"q{i}") for i in range(n)]


@pytest.mark.parametrize("damage", ["garbage bytes", "torn JSON", "JSON of another shape", "empty file"])
def test_a_corrupted_call_cache_entry_is_a_reported_miss(damage: str, fake_llm: FakeLLMServer, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(fake_llm, tmp_path)
    first = Step("drill", "b1", settings).call(_calls(3))
    assert all(r.ok and not r.cached for r in first) and len(fake_llm.requests) == 3
    entry = settings.cache_dir / first[1].key[:2] / f"{first[1].key}.json"
    entry.write_bytes({"garbage bytes": b"\x00\xff\xfe not json", "torn JSON": entry.read_bytes()[:20],
                       "JSON of another shape": b'["text"]', "empty file": b""}[damage])

    step = Step("drill", "b2", settings)
    with caplog.at_level(logging.WARNING, logger="codeclm.cache"):
        again = step.call(_calls(3))
    assert [r.ok for r in again] == [True] * 3 and [r.cached for r in again] == [True, False, True]
    assert again[1].value == first[1].value  # the call was made again, same answer on the deterministic server
    assert len(fake_llm.requests) == 4  # one call repeated: the corrupt one, nothing else
    assert step.stats.cache_unreadable == 1 and step.stats.failed == 0
    lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(lines) == 1 and str(entry) in lines[0] and "treating it as a miss" in lines[0]
    assert Step("drill", "b3", settings).call(_calls(3))[1].cached  # the fresh answer replaced the entry
