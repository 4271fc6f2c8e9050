"""No stage barriers inside a batch: while one instruction's answer is held back by the server, the others of
the same batch go on to scoring, filtering and improvement (their next round), and the held one finishes later
with the same tables as ever."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import settings_for
from test_generate_flow import SMALL, _check_published, _generate, _paper_text_model, _seed_file

from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = pytest.mark.timeout(300, method="thread")


def test_a_held_call_delays_only_its_own_instruction(prefect_harness: None, fake_llm: FakeLLMServer,
                                                     tmp_path: Path) -> None:
    improving = threading.Event()
    held: dict[str, Any] = {}

    def model(body: dict[str, Any]) -> str:
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if "improve instructions" in system:
            improving.set()
        elif ("helpful, accurate assistant" in system and body["model"] == "fake-strong" and not held
              and re.search(r"KEEP: explain poem", user)):
            held["instruction"] = user
            held["released_by_improve"] = improving.wait(60)  # with a stage barrier, no improve call could come
        return _paper_text_model(body)

    fake_llm.responder = model
    settings = settings_for(fake_llm, tmp_path, **SMALL | {"max_rounds": 3}, output_mode="text", timeout=120.0)
    out = tmp_path / "out"
    _generate(_seed_file(tmp_path), out, settings)
    assert held and held["released_by_improve"], "the other instructions waited for the held answer"
    published = _check_published(out)  # the held instruction still ended, and every table is consistent
    counts = published["manifest"]["counts"]
    assert counts["failed_instructions"] == 0 and counts["train"] > 0
    assert len({r.instruction_id for r in published["train.parquet"]}) == counts["train"]
    limits = {row["endpoint"].split("@")[0]: row for row in published["manifest"]["concurrency"]}
    assert set(limits) == {"openai/fake-strong", "openai/fake-target"}  # the run's adaptive limits are kept
    assert all(1 <= r["limit"] <= r["ceiling"] and r["calls"] > 0 and r["congestion"] == 0 for r in limits.values())
    assert sum(r["calls"] for r in limits.values()) == published["manifest"]["totals"]["calls"]
