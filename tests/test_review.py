"""The review gate (codeclm.ops.review) on real Prefect flow runs against the fake server: a metadata review that
drops ids, a dataset review that rejects, a review nobody answers; and the terminal's answers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import settings_for

from codeclm.ops.review import DatasetReview, MetadataReview, ReviewPending, ReviewRejected, parse_answer
from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = pytest.mark.timeout(300, method="thread")

SEEDS = [("s-poem", "Write a short poem about autumn rain on a tin roof."),
         ("s-sql", "My SQL query with three joins is slow on a small table. How do I find out why?"),
         ("s-moon", "Explain to a ten-year-old why the moon has phases.")]
SMALL = {"n_metadata": 4, "instructions_per_metadata": 2, "n_rubrics": 2, "max_rounds": 2, "budget": 100,
         "batch_size": 10, "max_parallel_batches": 2}
PAUSE_WAIT_S = 180.0


def test_terminal_answers() -> None:
    assert parse_answer("a", "dataset") == DatasetReview(decision="approve")
    assert parse_answer("reject  too many poems ", "dataset") == DatasetReview(decision="reject",
                                                                               reason="too many poems")
    assert parse_answer("r", "dataset") is None  # a rejection needs its reason
    drop = parse_answer("d meta-1, meta-2 meta-1", "metadata")
    assert isinstance(drop, MetadataReview) and drop.dropped() == ["meta-1", "meta-2"]
    assert drop.decision == "approve"
    assert parse_answer("d meta-1", "dataset") is None  # a dataset review drops nothing
    assert parse_answer("maybe", "metadata") is None


class _Run:
    """`generate` in a thread, as the CLI would run it; its outcome (result or exception) kept for the test."""

    def __init__(self, tmp_path: Path, settings: Any) -> None:
        self.seeds, self.out = tmp_path / "seeds.jsonl", tmp_path / "out"
        pd.DataFrame(SEEDS, columns=["seed_id", "instruction"]).to_json(self.seeds, orient="records", lines=True)
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._go, args=(settings,), daemon=True)
        self.thread.start()

    def _go(self, settings: Any) -> None:
        from flows.generate import generate

        try:
            self.result = generate(str(self.seeds), str(self.out), settings)
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(PAUSE_WAIT_S)
        assert not self.thread.is_alive(), "the flow did not finish after the review was answered"


def paused_run(started: float, needle: str = "") -> tuple[Any, str]:
    """The one paused flow run (created after `started`) and its form's description (once it holds `needle`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.input.run_input import keyset_from_paused_state

    deadline = time.monotonic() + PAUSE_WAIT_S
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            runs = [r for r in runs if r.created and r.created.timestamp() >= started - 1]
            if runs:
                (run,) = runs
                keyset = keyset_from_paused_state(run.state)
                for _ in range(50):  # the form is saved right after the state is set
                    try:
                        description = json.loads(client.read_flow_run_input(run.id, keyset["description"]))
                        if needle in description:
                            return run, description
                        break
                    except Exception:
                        time.sleep(0.2)
            time.sleep(0.5)
    raise AssertionError("no flow run paused for review")


def resume(run: Any, answer: dict[str, Any]) -> None:
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(run.id, run_input=answer)


def test_a_metadata_review_drops_the_listed_ids_and_the_rest_is_decoded(prefect_harness: None,
                                                                        fake_llm: FakeLLMServer,
                                                                        tmp_path: Path) -> None:
    started = time.time()
    run = _Run(tmp_path, settings_for(fake_llm, tmp_path, review="metadata", **SMALL))
    paused, description = paused_run(started)
    assert description.startswith("# Review the metadata") and "**4 metadata**" in description
    ids = [line.split("`")[1] for line in description.splitlines() if line.startswith("| `meta-")]
    assert len(ids) == 4
    calls = len(fake_llm.requests)
    time.sleep(3)
    assert run.thread.is_alive() and len(fake_llm.requests) == calls  # no instruction is decoded while it waits
    resume(paused, {"decision": "approve", "reason": "one is off topic", "drop_metadata_ids": ids[0]})
    run.join()
    assert run.error is None, run.error
    published = set(pd.read_parquet(run.out / "stages" / "metadata.parquet")["metadata_id"])
    assert published == set(ids[1:])
    train = pd.read_parquet(run.out / "train.parquet")
    assert len(train) > 0 and ids[0] not in set(train["metadata_id"])


def test_a_rejected_dataset_is_not_published(prefect_harness: None, fake_llm: FakeLLMServer,
                                             tmp_path: Path) -> None:
    started = time.time()
    run = _Run(tmp_path, settings_for(fake_llm, tmp_path, review="dataset", **SMALL))
    paused, description = paused_run(started)
    assert description.startswith("# Dataset profile") and "## Samples with lineage" in description
    assert "data:image/svg+xml;base64," in description
    assert not run.out.exists()  # staged, not published, while it waits
    resume(paused, {"decision": "reject", "reason": "responses too short"})
    run.join()
    assert isinstance(run.error, ReviewRejected) and "responses too short" in str(run.error)
    assert not run.out.exists()


def test_a_review_nobody_answers_ends_the_run_with_nothing_published(prefect_harness: None,
                                                                     fake_llm: FakeLLMServer,
                                                                     tmp_path: Path) -> None:
    run = _Run(tmp_path, settings_for(fake_llm, tmp_path, review="dataset", review_timeout=3, **SMALL))
    run.join()
    assert isinstance(run.error, ReviewPending), run.error
    assert "not reviewed within 3 s" in str(run.error) and "run the same command again" in str(run.error)
    assert not run.out.exists()


def test_an_interactive_run_is_answered_in_the_terminal(prefect_harness: None, fake_llm: FakeLLMServer,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The terminal answer resumes the paused run through Prefect, the same way the UI form does."""
    import os
    import sys

    from codeclm.ops import review

    read_end, write_end = os.pipe()
    monkeypatch.setattr(review, "_interactive", lambda: True)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read_end))
    with os.fdopen(write_end, "w") as terminal:
        terminal.write("maybe\nr the responses are too short\n")  # the first line is not understood, asked again
    run = _Run(tmp_path, settings_for(fake_llm, tmp_path, review="dataset", **SMALL))
    run.join()  # the answer can only reach the flow by resuming its paused run (Prefect checks it is paused)
    assert isinstance(run.error, ReviewRejected) and "the responses are too short" in str(run.error)
    printed = capsys.readouterr().out
    assert "Dataset profile" in printed and "not understood: 'maybe'" in printed
    assert not run.out.exists()


def test_a_rejection_without_reason_or_unknown_ids_are_asked_again(prefect_harness: None, fake_llm: FakeLLMServer,
                                                                  tmp_path: Path) -> None:
    started = time.time()
    run = _Run(tmp_path, settings_for(fake_llm, tmp_path, review="metadata", **SMALL))
    paused, _ = paused_run(started)
    resume(paused, {"decision": "reject", "reason": "  "})
    paused, description = paused_run(started, "Not done")
    assert description.startswith("> **Not done:** a rejection needs a reason; answer again.")
    resume(paused, {"decision": "approve", "drop_metadata_ids": "meta-nope"})
    paused, description = paused_run(started, "meta-nope")
    assert description.startswith("> **Not done:** no metadata has the id(s) meta-nope; answer again.")
    resume(paused, {"decision": "approve"})
    run.join()
    assert run.error is None, run.error
    assert len(pd.read_parquet(run.out / "stages" / "metadata.parquet")) == 4  # nothing was dropped
