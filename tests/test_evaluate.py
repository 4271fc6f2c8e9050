"""The `evaluate` flow on the real Prefect engine against the real fake LLM server, with a scripted judge.

One module-scoped evaluation (7 questions, one target) is the starting point; later tests rerun on the same
home to show what is cached. Artifacts are read back through Prefect's API, not trusted from the code.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pyarrow.parquet as pq
import pytest
from conftest import settings_for
from typer.testing import CliRunner

from codeclm.errors import ModelError
from codeclm.publish import leftovers
from codeclm.settings import Settings
from codeclm.testing.fake_llm import FakeLLMServer

VICUNA = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vicuna_80.jsonl"
START = "[The Start of Assistant {}'s Answer]\n<answer>\n"
# question -> ((target, strong) scores in order target_first (the fake server's "A"), (target, strong) in order
# strong_first ("B")); q7's judge output is broken
SCRIPT: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "q1": ((8, 6), (8, 6)),  # target wins both: win
    "q2": ((5, 9), (5, 9)),  # strong wins both: loss
    "q3": ((7, 7), (7, 7)),  # two draws: tie
    "q4": ((8, 6), (5, 9)),  # the order decided: tie, flipped
    "q5": ((8, 6), (7, 7)),  # win + draw: tie (codeclm), win (alpagasus), flipped
    "q6": ((5, 9), (7, 7)),  # loss + draw: tie (codeclm), loss (alpagasus), flipped
}
BROKEN = "fake-target answers q7"  # only in judge prompts (the target's answer to q7), never in answer prompts


@dataclass
class Judge:
    """The fake server's scripted brain; records (kind, model, question, order) of every request it saw."""

    seen: list[tuple[str, str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, body: dict[str, Any]) -> str | None:
        """Scripted answers and verdicts; None (the server's own schema-valid output) for anything else."""
        user = body["messages"][-1]["content"]
        scripted = re.search(r"Question (q\d+)", user)
        question = scripted.group(1) if scripted else "other"
        if START.format(1) not in user:
            if scripted is None:
                return None
            self._log("answer", body["model"], question, "")
            size = 30 if "target" in body["model"] else 80  # different lengths, to check the length means
            return f"{body['model']} answers {question}: " + "x" * size
        first = user.split(START.format(1), 1)[1]
        order = "A" if first.startswith("fake-target") else "B"
        self._log("judge", body["model"], question, order)
        target, strong = SCRIPT.get(question, ((6, 6), (6, 6)))[0 if order == "A" else 1]
        scores = (target, strong) if order == "A" else (strong, target)
        return json.dumps({"score_1": scores[0], "score_2": scores[1], "explanation": "scripted"})

    def _log(self, *entry: str) -> None:
        with self.lock:
            self.seen.append(entry)  # type: ignore[arg-type]

    def since(self, mark: int) -> list[tuple[str, str, str, str]]:
        with self.lock:
            return self.seen[mark:]


@dataclass
class Setup:
    server: FakeLLMServer
    judge: Judge
    settings: Settings
    benchmark: str
    root: Path
    first: dict[str, Any]
    flow_run_id: UUID


def run_evaluate(out: Path, **kwargs: Any) -> tuple[dict[str, Any], UUID]:
    from flows.evaluate import evaluate

    state = evaluate(out=str(out), return_state=True, **kwargs)
    return state.result(), state.state_details.flow_run_id


@pytest.fixture(scope="module")
def setup(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """The first evaluation: 7 questions, target fake-target, the judge breaks on q7 in both orders."""
    root = tmp_path_factory.mktemp("evaluate")
    benchmark = root / "scripted.jsonl"
    benchmark.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question q{i}: say something."}) + "\n"
                                 for i in range(1, 8)))
    judge = Judge()
    with FakeLLMServer(responder=judge) as server:
        server.set_faults([{"kind": "invalid_json", "match": BROKEN}])
        settings = settings_for(server, root)
        first, run_id = run_evaluate(root / "out", benchmarks=[str(benchmark)], settings=settings)
        yield Setup(server, judge, settings, str(benchmark), root, first, run_id)


def test_both_orders_scripted_crr_and_failures(setup: Setup) -> None:
    seen = setup.judge.seen
    answers = [(model, q) for kind, model, q, _ in seen if kind == "answer"]
    assert sorted(answers) == sorted((m, f"q{i}") for m in ("fake-strong", "fake-target") for i in range(1, 8))
    judged = [(q, order) for kind, _, q, order in seen if kind == "judge"]
    for question in SCRIPT:  # each judged question: exactly one request per order
        assert sorted(o for q, o in judged if q == question) == ["A", "B"]
    # the judge (temperature 0) gave the same broken answer twice per order: asking a third time cannot help
    assert sorted(o for q, o in judged if q == "q7") == ["A", "A", "B", "B"]

    (row,) = setup.first.results
    assert (row.wins, row.ties, row.losses, row.failures, row.total) == (1, 4, 1, 1, 6)
    assert row.crr == pytest.approx(500 / 6)
    assert row.ci_low <= row.crr <= row.ci_high
    assert row.flip_rate == pytest.approx(3 / 6)
    assert row.mean_target_length == len("fake-target answers q1: ") + 30
    assert row.mean_strong_length == len("fake-strong answers q1: ") + 80
    assert (row.target, row.strong, row.judge) == ("openai/fake-target", "openai/fake-strong",
                                                            "openai/fake-judge")
    assert row.judge_is_strong is False

    out = Path(setup.first.out)
    assert sorted(p.name for p in out.iterdir()) == ["crr.svg", "failed_calls.parquet", "questions.parquet",
                                                     "report.md", "summary.json", "summary.parquet"]
    assert out.is_symlink() and leftovers(out) == []  # published by one flip, no staging left beside it
    questions = {r["question_id"]: r for r in pq.read_table(out / "questions.parquet").to_pylist()}
    assert [questions[f"q{i}"]["outcome"] for i in range(1, 8)] == ["win", "loss", "tie", "tie", "tie", "tie",
                                                                    "failed"]
    assert questions["q7"]["failure"].startswith("judge, order strong_first: ParseError")
    assert questions["q7"]["judge_output"] == '{"answer": '
    assert questions["q4"]["flipped"] and not questions["q1"]["flipped"]
    assert json.loads((out / "summary.json").read_text())["results"][0]["crr"] == pytest.approx(500 / 6)
    assert "q7" in (out / "report.md").read_text() and "![CRR" in (out / "report.md").read_text()
    ET.fromstring((out / "crr.svg").read_text())


def test_artifacts_reach_the_prefect_api(setup: Setup) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        ours = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[setup.flow_run_id])))
        (stages,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[setup.flow_run_id])))
        nested = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[stages.id])))
    by_key = {a.key: a for a in ours}
    assert by_key["crr-leaderboard"].type == "table"
    table = json.loads(by_key["crr-leaderboard"].data)
    assert [(r["benchmark"], r["target"], r["wins"], r["ties"], r["losses"], r["failures"]) for r in table] == [
        ("scripted", "openai/fake-target", 1, 4, 1, 1)]
    report = by_key["crr-report"]
    assert report.type == "markdown"
    image = re.search(r"\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", report.data).group(1)  # type: ignore[union-attr]
    svg = ET.fromstring(base64.b64decode(image))
    assert any(r.find("{http://www.w3.org/2000/svg}title") is not None for r in svg.iter("{http://www.w3.org/2000/svg}rect"))
    assert "| scripted | `openai/fake-target` | 1 | 4 | 1 | 1 | 6 | 83.33 |" in report.data
    # one progress view for the run, on the run itself: a bar at 100 % and a table of its stages
    assert not [a for a in nested if a.type == "progress"]
    (progress,) = [a for a in ours if a.type == "progress"]
    assert progress.key == "evaluate-progress" and progress.data == 100.0
    assert "| eval answer | 2/2 | done |" in progress.description
    assert "| eval judge | 1/1 | done |" in progress.description


def test_rerun_answers_are_cached_and_a_second_target_costs_only_its_own(setup: Setup) -> None:
    mark = len(setup.judge.since(0))
    result, _ = run_evaluate(setup.root / "out2", benchmarks=[setup.benchmark], settings=setup.settings,
                             targets=["openai/fake-target", "openai/fake-target-2"])
    new = setup.judge.since(mark)
    assert sorted(q for kind, model, q, _ in new if kind == "answer") == [f"q{i}" for i in range(1, 8)]
    assert {model for kind, model, _, _ in new if kind == "answer"} == {"fake-target-2"}
    judged = [(q, order) for kind, _, q, order in new if kind == "judge"]
    # fake-target-2's verdicts only: fake-target's q7 failed the same way twice at temperature 0, and the rerun
    # reports that kept failure from the call cache instead of asking again
    assert sorted(judged) == sorted((f"q{i}", o) for i in range(1, 8) for o in "AB")
    first, second = result.results
    assert first == setup.first.results[0]
    assert (second.target, second.wins, second.ties, second.losses, second.total) == (
        "openai/fake-target-2", 1, 5, 1, 7)


def test_another_rule_reuses_every_answer_and_verdict(setup: Setup) -> None:
    mark = len(setup.judge.since(0))
    result, _ = run_evaluate(setup.root / "out3", benchmarks=[setup.benchmark], settings=setup.settings,
                             rule="alpagasus")
    new = setup.judge.since(mark)
    assert [kind for kind, *_ in new if kind == "answer"] == []
    assert [kind for kind, *_ in new if kind == "judge"] == []  # q7's kept failure too comes from the cache
    (row,) = result.results
    assert (row.wins, row.ties, row.losses, row.failures) == (2, 2, 2, 1)
    assert row.crr == pytest.approx(400 / 6)
    questions = {r["question_id"]: r for r in pq.read_table(Path(result.out) / "questions.parquet").to_pylist()}
    assert "--retry-failed asks again" in questions["q7"]["failure"]


def test_retry_failed_asks_the_kept_failures_again_and_nothing_else(setup: Setup) -> None:
    mark = len(setup.judge.since(0))
    settings = setup.settings.model_copy(update={"retry_failed": True})
    result, _ = run_evaluate(setup.root / "out4", benchmarks=[setup.benchmark], settings=settings)
    new = setup.judge.since(mark)
    assert sorted((kind, q, order) for kind, _, q, order in new) == [("judge", "q7", o) for o in "AABB"]
    assert result.results[0].failures == 1  # the judge still breaks on it: kept again


def test_a_judge_that_never_scores_fails_the_run_and_writes_nothing(setup: Setup) -> None:
    """A new judge model (so no verdict comes from the cache) whose every reply is broken JSON."""
    setup.server.set_faults([{"kind": "invalid_json", "match": BROKEN},
                             {"kind": "invalid_json", "match": "fake-judge-2"}])
    judge = setup.settings.judge.model_copy(update={"model": "openai/fake-judge-2"})
    settings = setup.settings.model_copy(update={"judge": judge, "parse_attempts": 1})
    with pytest.raises(ModelError, match=r"judge model openai/fake-judge-2 never returned scores .*'\{\"answer\": '"):
        run_evaluate(setup.root / "never", benchmarks=[setup.benchmark], limit=2, settings=settings)
    assert not list(setup.root.glob("*never*"))


def test_the_same_model_as_target_and_strong_is_refused_before_any_call(setup: Setup) -> None:
    from codeclm.errors import ConfigError

    mark = len(setup.judge.since(0))
    with pytest.raises(ConfigError, match="same model"):
        run_evaluate(setup.root / "self", benchmarks=[setup.benchmark], settings=setup.settings,
                     targets=["openai/fake-strong"])
    assert setup.judge.since(mark) == [] and not (setup.root / "self").exists()


def test_cli_evaluates_the_vicuna_file_and_prints_the_leaderboard(setup: Setup) -> None:
    from codeclm.cli import app

    config = setup.root / "roles.toml"
    config.write_text("".join(f'[{role}]\napi_base = "{setup.server.url}"\noutput_mode = "json_schema"\n'
                              f'temperature = {0.0 if role == "judge" else 0.7}\n'
                              for role in ("strong", "target", "judge")))
    out = setup.root / "vicuna-out"
    args = ["evaluate", "--benchmark", str(VICUNA), "--limit", "3", "--target", "openai/fake-target",
            "--strong", "openai/fake-strong", "--judge", "openai/fake-judge", "--config", str(config),
            "--out", str(out)]
    mark = len(setup.judge.since(0))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "vicuna_80" in result.output and "CRR" in result.output
    rows = [json.loads(line) for line in VICUNA.read_text().splitlines()[:3]]
    questions = pq.read_table(out / "questions.parquet").to_pylist()
    assert [q["prompt"] for q in questions] == [r["turns"][0] for r in rows]
    assert len([e for e in setup.judge.since(mark) if e[0] == "judge"]) == 6


@pytest.mark.parametrize(("args", "message"), [
    (["--benchmark", "no-such-benchmark"], "Unknown benchmark 'no-such-benchmark'"),
    (["--benchmark", str(VICUNA), "--limit", "0"], "limit must be at least 1"),
    (["--benchmark", str(VICUNA), "--prompt-column", "nope"], "has no column 'nope'"),
    (["--benchmark", str(VICUNA), "--target", "openai/x", "--strong", "openai/x"], "same model"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    from codeclm.cli import app

    result = CliRunner().invoke(app, ["evaluate", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()
