"""The `generate` flow end to end on Prefect against the fake server: what it publishes, what a rerun costs,
faults, the Self-Rubrics round loop, and failing runs that must leave a published dataset alone."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import settings_for

from codeclm.errors import DatasetError, ModelError
from codeclm.profile import CHARTS
from codeclm.publish import leftovers
from codeclm.records import Candidate, FailedCall, FilterDecision, RejectedCandidate, Response, RubricSet, TrainingPair
from codeclm.storage import read_records, write_records
from codeclm.testing.fake_llm import FakeLLMServer
from tasks._base import ref_to
from tasks.export import STAGE_TABLES, export
from tasks.respond import answer_messages

# A hung flow cannot be interrupted by a signal (Prefect joins its worker threads on the way out): time out
# by dumping every stack and ending the session instead.
pytestmark = pytest.mark.timeout(300, method="thread")

SEEDS = [
    ("s-poem", "Write a short poem about autumn rain on a tin roof."),
    ("s-sql", "My SQL query with three joins is slow on a small table. How do I find out why?"),
    ("s-moon", "Explain to a ten-year-old why the moon has phases."),
]
TOP_FILES = {"train.parquet", "train.jsonl", "rejected.parquet", "failed_calls.parquet", "manifest.json"}
TABLES = {"train.parquet": TrainingPair, "rejected.parquet": RejectedCandidate, "failed_calls.parquet": FailedCall,
          **{f"stages/{name}.parquet": model for name, model in STAGE_TABLES.items()}}
SMALL = {"n_metadata": 4, "instructions_per_metadata": 2, "n_rubrics": 2, "max_rounds": 2, "budget": 100,
         "batch_size": 10, "max_parallel_batches": 2}


def _seed_file(tmp_path: Path, seeds: list[tuple[str, str]] = SEEDS) -> Path:
    path = tmp_path / "seeds.jsonl"
    pd.DataFrame(seeds, columns=["seed_id", "instruction"]).to_json(path, orient="records", lines=True)
    return path


def _generate(seeds: Path, out: Path, settings: Any) -> dict[str, Any]:
    from flows.generate import generate

    return generate(str(seeds), str(out), settings)


def _check_published(out: Path) -> dict[str, Any]:
    """Everything a consumer relies on: files, schemas, chat JSONL, hashes and the lineage invariant."""
    assert {p.name for p in out.iterdir()} >= TOP_FILES
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.parquet")} == set(TABLES)
    rows = {name: read_records(out / name, model) for name, model in TABLES.items()}  # validates each schema
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == set(TABLES) | {"train.jsonl", "profile.json", "profile.md", *CHARTS.values()}
    for name, sha in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha, name

    train: list[TrainingPair] = rows["train.parquet"]
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert lines == [{"messages": [*answer_messages(p.instruction), {"role": "assistant", "content": p.response}]}
                     for p in train]  # the messages the answer was made under, system prompt included

    counts = manifest["counts"]
    rejected: list[RejectedCandidate] = rows["rejected.parquet"]
    failed_ids = {f.instruction_id for f in rows["failed_calls.parquet"] if f.instruction_id}
    assert counts["train"] == len(train) and counts["failed_instructions"] == len(failed_ids)
    assert sum(counts["rejected"].values()) == len(rejected)
    assert counts["basic_instructions"] == len(train) + len(rejected) + len(failed_ids)
    ends = [p.instruction_id for p in train] + [r.instruction_id for r in rejected] + sorted(failed_ids)
    assert len(ends) == len(set(ends))  # no instruction ends twice
    round_one = {c.instruction_id for c in rows["stages/candidates.parquet"] if c.round == 1}
    assert round_one | {r.instruction_id for r in rejected if r.reason in ("seed_overlap", "duplicate")} == set(ends)

    responses = {(r.candidate_id, r.role): r.text for r in rows["stages/responses.parquet"]}
    for pair in train:  # nothing malformed in train: every pair is a judged candidate with its real answers
        assert pair.instruction.strip() and pair.response.strip()
        assert pair.response == responses[(pair.candidate_id, pair.response_source)]
        assert pair.instruction_id not in failed_ids
        assert (pair.gap > 3) if pair.response_source == "strong" else (pair.gap < -3)
    return {"manifest": manifest, **rows}


def _no_leftovers(out: Path) -> None:
    assert leftovers(out) == [], f"staging or old copies left behind: {leftovers(out)}"


def test_generate_publishes_a_valid_dataset_and_a_rerun_is_free(prefect_harness: None, fake_llm: FakeLLMServer,
                                                                tmp_path: Path) -> None:
    # one round here (the round loop has its own test, and the resume test reruns two); a budget below the kept
    # pairs, so budget sampling runs end to end
    settings = settings_for(fake_llm, tmp_path, **SMALL | {"max_rounds": 1, "budget": 2})
    seeds, out = _seed_file(tmp_path), tmp_path / "out"
    summary = _generate(seeds, out, settings)
    published = _check_published(out)
    _no_leftovers(out)
    assert out.is_symlink()  # published by one flip (codeclm.publish)
    manifest = published["manifest"]
    requests = len(fake_llm.requests)
    counts = manifest["counts"]
    assert summary.train == len(published["train.parquet"]) == 2
    assert sum(counts["kept_per_round"].values()) == 2 + counts["rejected"]["over_budget"] > 2
    assert counts["seeds"] == len(SEEDS) and counts["metadata"]["seed"] == len(SEEDS)
    assert manifest["totals"]["calls"] == requests and manifest["totals"]["failed"] == 0
    assert manifest["totals"]["unpriced_calls"] == requests and manifest["totals"]["cost_usd"] == 0
    assert manifest["run"]["flow_run_id"] and manifest["settings"]["strong"]["api_base"] == fake_llm.url
    assert all(r["status"] == 200 for r in fake_llm.requests)

    version = os.readlink(out)
    again = _generate(seeds, out, settings)  # the same server, so the same api_base and cache keys
    assert len(fake_llm.requests) == requests, "a rerun of a finished run made LLM calls"
    assert again.reused and not summary.reused and os.readlink(out) == version  # taken as it is, not remade
    assert again.counts == summary.counts and again.totals == summary.totals

    (out / "train.jsonl").write_text("tampered\n")  # a file no longer as the manifest hashed it: made again
    remade = _generate(seeds, out, settings)
    assert not remade.reused and os.readlink(out) != version
    assert len(fake_llm.requests) == requests, "remaking a finished run's files made LLM calls"
    republished = _check_published(out)
    assert republished["train.parquet"] == published["train.parquet"]
    assert remade.counts == summary.counts
    _no_leftovers(out)


def test_faults_end_in_failed_calls_and_never_in_train(prefect_harness: None, fake_llm: FakeLLMServer,
                                                      tmp_path: Path) -> None:
    fake_llm.set_faults([
        {"kind": "invalid_json", "match": "is slow on a small table"},     # one seed never encodes
        {"kind": "http", "status": 429, "match": "Assistant 1", "times": 8},  # scoring is rate limited
        {"kind": "http", "status": 503, "retry_after": 0, "match": "domain-specific rubrics", "times": 2},
        {"kind": "truncate", "match": "Skills required to respond", "times": 1},  # a decode answer is cut off
        {"kind": "reset", "match": "helpful, accurate assistant", "times": 3},
        {"kind": "http", "status": 429, "times": 2},                       # and anything else, early on
    ])
    settings = settings_for(fake_llm, tmp_path, **SMALL | {"max_rounds": 1}, max_attempts=3, parse_attempts=2)
    out = tmp_path / "out"
    _generate(_seed_file(tmp_path), out, settings)
    published = _check_published(out)

    failed: list[FailedCall] = published["failed_calls.parquet"]
    encode_failures = [f for f in failed if f.stage == "encode"]
    assert [(f.item_id, f.error_type, f.raw_text, f.attempts) for f in encode_failures] == [
        ("s-sql", "ParseError", '{"answer": ', 2)]
    assert all(f.call_key and f.message for f in failed)
    statuses = [r["status"] for r in fake_llm.requests]
    assert statuses.count(429) == 10 and statuses.count(503) == 2 and statuses.count(None) == 3
    assert [r["fault"] for r in fake_llm.requests].count("truncate") == 1
    assert {s.seed_id for s in published["stages/seeds.parquet"]} == {s for s, _ in SEEDS}
    assert all("s-sql" not in m.seed_ids for m in published["stages/metadata.parquet"])  # nothing came of it
    manifest = published["manifest"]
    assert manifest["counts"]["failed_calls"].get("encode") == 1
    assert manifest["totals"]["failed"] == len(failed)


def _paper_text_model(body: dict[str, Any]) -> str:
    """A model answering the paper's plain-text formats: basic instructions tie in scoring; once improved,
    'KEEP' instructions get a clear strong win and 'TIE' ones keep tying, so they use every round."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    assert "response_format" not in body
    if "analyse instructions" in system:
        seed = user.rsplit("<instruction>", 1)[1]
        topic = re.sub(r"[^a-z ]", "", seed.lower()).split()[3]
        return f"Use case: {topic} questions\nSkills: {topic} knowledge, clear writing"
    if "write instructions" in system:
        use_case = re.search(r"Use case of the instructions: (.*)", user)[1]
        skills = re.search(r"Skills required to respond to the instructions: (.*)", user)[1]
        return f"1. KEEP: explain {use_case} using {skills}.\n2. TIE: describe {use_case} using {skills}."
    if "judge instructions" in system:
        return ("Rubrics:\n1. Depth of reasoning.\n2. Number of constraints.\n"
                "Actions:\n1. Require step-by-step reasoning.\n2. Add two explicit constraints.")
    if "improve instructions" in system:
        inner = user.split("<instruction>", 1)[1].split("</instruction>", 1)[0].strip()
        return f"Improved instruction: IMPROVED {inner}"
    if "helpful, accurate assistant" in system:
        return f"An answer written by {body['model']}."
    if "quality of an answer" in system:
        question = user.split("<question>", 1)[1].split("</question>", 1)[0]
        strong_first = "fake-strong" in user.split("<answer>", 2)[1]
        strong, target = (9, 2) if "IMPROVED" in question and "KEEP" in question else (5, 5)
        return f"{strong} {target}" if strong_first else f"{target} {strong}"
    raise AssertionError(f"unexpected prompt {system[:60]!r}")


def test_round_loop_runs_every_round_in_plain_text_mode(prefect_harness: None, fake_llm: FakeLLMServer,
                                                        tmp_path: Path) -> None:
    fake_llm.responder = _paper_text_model
    settings = settings_for(fake_llm, tmp_path, **SMALL | {"max_rounds": 3}, output_mode="text")
    out = tmp_path / "out"
    _generate(_seed_file(tmp_path), out, settings)
    published = _check_published(out)
    counts = published["manifest"]["counts"]

    basic = counts["basic_instructions"]
    assert basic == 2 * sum(counts["metadata"].values()) > 0
    assert counts["candidates_per_round"] == {"1": basic, "2": basic, "3": basic // 2}
    assert counts["kept_per_round"] == {"2": basic // 2} and counts["kept_sources"] == {"strong": basic // 2}
    assert counts["rejected"] == {"below_threshold": basic // 2} and counts["failed_instructions"] == 0

    actions = {a for r in published["stages/rubrics.parquet"] for a in r.actions}
    assert actions == {"Require step-by-step reasoning.", "Add two explicit constraints."}
    for pair in published["train.parquet"]:
        assert pair.round == 2 and pair.basic_instruction.startswith("KEEP")
        assert pair.instruction == f"IMPROVED {pair.basic_instruction}"
        assert len(pair.actions_applied) == 1 and pair.actions_applied[0] in actions
        assert pair.response == "An answer written by fake-strong." and pair.gap == 7
    third: list[Candidate] = [c for c in published["stages/candidates.parquet"] if c.round == 3]
    assert all(c.basic_instruction.startswith("TIE") and c.instruction.startswith("IMPROVED IMPROVED TIE")
               for c in third)
    assert all(sorted(c.actions_applied) == sorted(actions) for c in third)  # sampled without replacement
    decisions: list[FilterDecision] = published["stages/decisions.parquet"]
    assert {d.decision for d in decisions if d.round == 1} == {"next_round"}
    assert {d.decision for d in decisions if d.round == 3} == {"reject"}
    assert all(r.round == 3 and r.gap == 0 for r in published["rejected.parquet"])
    assert {r["response_format"] for r in fake_llm.requests} == {None}


def _published_before(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True)
    (out / "manifest.json").write_text('{"run": "the previous, good one"}\n')
    (out / "train.jsonl").write_text('{"messages": []}\n')
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_run_whose_calls_all_fail_publishes_nothing(prefect_harness: None, fake_llm: FakeLLMServer,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _published_before(out)
    fake_llm.set_faults([{"kind": "http", "status": 401}])
    with pytest.raises(ModelError, match="authentication failed"):
        _generate(_seed_file(tmp_path), out, settings_for(fake_llm, tmp_path, **SMALL))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _no_leftovers(out)
    assert 0 < len(fake_llm.requests) <= len(SEEDS)  # it stopped at the first stage


def test_a_run_where_every_instruction_failed_publishes_nothing(prefect_harness: None, fake_llm: FakeLLMServer,
                                                                tmp_path: Path) -> None:
    """Unparsable output is not an endpoint failure, so the run goes on, but an empty dataset made only of
    failures must not replace the published one."""
    out = tmp_path / "out"
    before = _published_before(out)
    fake_llm.set_faults([{"kind": "invalid_json"}])
    with pytest.raises(DatasetError, match="nothing to publish"):
        _generate(_seed_file(tmp_path), out, settings_for(fake_llm, tmp_path, **SMALL, parse_attempts=1))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _no_leftovers(out)


def test_a_dataset_failing_its_checks_publishes_nothing(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    """The export step itself (no flow needed): an instruction with no ending fails the lineage check."""
    settings = settings_for(fake_llm, tmp_path, **SMALL)
    out = tmp_path / "out"
    before = _published_before(out)
    orphan = Candidate(candidate_id="cand-1", instruction_id="inst-1", metadata_id="meta-1", seed_ids=["s"],
                       use_case="u", skills=["k"], round=1, instruction="i", basic_instruction="i",
                       actions_applied=[])
    refs = {"candidates": [ref_to(write_records(tmp_path / "c.parquet", [orphan], Candidate))],
            "responses": [ref_to(write_records(tmp_path / "r.parquet", [], Response))],
            "rubrics": [ref_to(write_records(tmp_path / "rs.parquet", [], RubricSet))]}
    with pytest.raises(DatasetError, match="1 instructions vanished"):
        export.fn(refs, settings, str(out), {"flow_run_id": "test"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _no_leftovers(out)
