"""Baselines (issue 10): ROUGE-L and the Alpagasus threshold as units, then each baseline flow end to end on
Prefect against the fake server: exact budgets, the filters at work, shortfalls reported, free reruns."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import settings_for

from codeclm.baseline_records import MAX_LINEAGES, BaselineRejected, PoolInstruction, Rating, lineages
from codeclm.errors import ParseError
from codeclm.records import Candidate, FailedCall, Seed, TrainingPair
from codeclm.rouge import RougePool, lcs_length, rouge_l, tokens
from codeclm.settings import Settings
from codeclm.storage import read_records
from codeclm.testing.fake_llm import FakeLLMServer
from tasks.alpagasus import kept, parse_rating
from tasks.evol import METHODS, pick_methods
from tasks.pairs import failed_answer
from tasks.respond import answer_messages

pytestmark = pytest.mark.timeout(300, method="thread")

SEEDS = [
    ("s-poem", "Write a short poem about autumn rain on a tin roof."),
    ("s-sql", "My SQL query with three joins is slow on a small table. How do I find out why?"),
    ("s-moon", "Explain to a ten-year-old why the moon has phases."),
    ("s-bread", "Give me a simple recipe for bread without yeast."),
]
_INSTRUCTION = re.compile(r"<instruction>\s*(.*?)\s*</instruction>", re.DOTALL)


# --- ROUGE-L ---------------------------------------------------------------------------------------------------

def test_rouge_l_known_values() -> None:
    assert tokens("Don't STOP, re-read it!") == ["don", "t", "stop", "re", "read", "it"]
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook example (CLRS 15.4)
    assert lcs_length(["a", "b"], []) == 0
    # 6 and 6 tokens, LCS "the cat on the mat" = 5: F = 2 * 5 / 12
    assert rouge_l("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(10 / 12)
    assert rouge_l("a b c d", "d c b a") == pytest.approx(2 * 1 / 8)  # reversed: LCS of one token
    assert rouge_l("same words here", "Same, words... here!") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("!!!", "?") == 0.0
    # 4 vs 6 tokens, LCS 4: P = 1, R = 2/3, F = 2PR/(P+R) = 0.8
    assert rouge_l("write a short poem", "write a very short funny poem") == pytest.approx(0.8)


def test_rouge_pool_filter_matches_brute_force_and_threshold() -> None:
    pool = RougePool(0.7)
    pool.add("Write a short poem about autumn rain on a tin roof.")
    ok, score = pool.accepts("Write a short poem about autumn rain on a metal roof.")  # 10 of 11 tokens
    assert not ok and score == pytest.approx(20 / 22)
    ok, score = pool.accepts("Explain how a bicycle gear works.")
    assert ok and score < 0.7
    assert pool.accepts("   ") == (False, 0.0)
    # exactly at the threshold is rejected: 0.7 is not below 0.7 (7 shared tokens of 10 and 10)
    at = RougePool(0.7)
    at.add("a b c d e f g h i j")
    assert at.accepts("a b c d e f g x y z") == (False, pytest.approx(0.7))

    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "river", "tree", "stone"]
    rng = random.Random(7)
    texts = [" ".join(rng.choices(words, k=rng.randint(3, 9))) for _ in range(120)]
    brute = RougePool(0.7)
    for i, text in enumerate(texts):
        best = max((rouge_l(text, other) for other in texts[:i]), default=0.0)
        got = brute.max_score(text)
        assert (got >= 0.7) == (best >= 0.7), text  # the shared-token bound never changes a decision
        if best >= 0.7:
            assert got >= 0.7
        else:
            assert got <= best
        brute.add(text)


# --- Alpagasus and Evol units ----------------------------------------------------------------------------------

def test_alpagasus_threshold_and_rating_parse() -> None:
    settings = Settings()
    assert settings.baselines.alpagasus_threshold == 4.5
    assert kept(4.5, settings) and kept(5, settings) and not kept(4.4, settings) and not kept(4, settings)
    assert parse_rating("Rating: 4.5\nbecause ...").rating == 4.5
    assert parse_rating("**Rating:** 5").rating == 5 and parse_rating("3").rating == 3
    # the original filter's format: the score alone on the first line, the explanation after it; 0 is on the scale
    rated = parse_rating("4.5\nThe answer is accurate and complete.")
    assert rated.rating == 4.5 and rated.explanation == "The answer is accurate and complete."
    assert parse_rating("0\nWrong.").rating == 0
    assert parse_rating("Score: 4/5").rating == 4 and parse_rating("4.5 out of 5").rating == 4.5
    assert parse_rating("Assistant 1: 2").rating == 2  # a label's number is not the score
    assert parse_rating('{"rating": 4.5, "explanation": "cut sh').rating == 4.5  # JSON cut in its explanation
    assert parse_rating("\n\n5 - accurate\n").rating == 5
    with pytest.raises(ParseError):
        parse_rating("The answer is good.\n5")  # only the first line counts
    with pytest.raises(ValueError):
        parse_rating("Rating: 7")  # outside 0-5


def test_evol_lineages_methods_and_answer_check() -> None:
    assert lineages(roots=4, want=8, rounds=2) == 1  # 4 roots x 2 rounds
    assert lineages(roots=100, want=10, rounds=4) == 1  # every root is evolved, however many
    assert lineages(roots=3, want=10, rounds=2) == 2  # two chains per root: 3 x 2 x 2 = 12
    assert lineages(roots=44, want=2500, rounds=4) == 6  # 44 x 6 x 4 = 1,056: the cap, then a shortfall
    assert lineages(roots=1, want=10_000, rounds=2) == MAX_LINEAGES == len(METHODS)  # one per evolution method
    settings = Settings()
    draws = [pick_methods(f"i{n}", 1, 3, settings) for n in range(300)]
    assert all(len(set(d)) == 3 and set(d) <= set(METHODS) for d in draws)
    assert pick_methods("i1", 1, 3, settings) == draws[1]  # reproducible
    breadth = sum("breadth" in d for d in draws) / len(draws)
    depth = sum("deepen" in d for d in draws) / len(draws)
    assert breadth < depth  # in-breadth is the rarer kind
    off = settings.model_copy(update={"baselines": settings.baselines.model_copy(
        update={"evol_breadth_weight": 0.0})})
    assert all("breadth" not in pick_methods(f"i{n}", 1, 6, off) for n in range(20))
    assert failed_answer("Sorry, I can't help with that.") and not failed_answer("Here is the recipe: ...")
    assert not failed_answer("sorry " + "word " * 90)  # long answers that apologise are answers


# --- flows -----------------------------------------------------------------------------------------------------

def _seed_file(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    pd.DataFrame(SEEDS, columns=["seed_id", "instruction"]).to_json(path, orient="records", lines=True)
    return path


def _baseline(method: str, tmp_path: Path, settings: Settings, out: str = "out") -> dict[str, Any]:
    from flows.baselines import baseline

    return baseline(method, str(_seed_file(tmp_path)), str(tmp_path / out), settings)


def _published(out: Path) -> dict[str, Any]:
    """The files `generate` publishes, with the same schemas for train and failed calls, and valid hashes."""
    manifest = json.loads((out / "manifest.json").read_text())
    for name, sha in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha, name
    train = read_records(out / "train.parquet", TrainingPair)
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert lines == [{"messages": [*answer_messages(p.instruction), {"role": "assistant", "content": p.response}]}
                     for p in train]
    stages = {p.stem: p for p in (out / "stages").glob("*.parquet")}
    return {"manifest": manifest, "train": train,
            "rejected": read_records(out / "rejected.parquet", BaselineRejected),
            "failed": read_records(out / "failed_calls.parquet", FailedCall),
            "instructions": read_records(stages["instructions"], PoolInstruction),
            "seeds": read_records(stages["seeds"], Seed), "stages": stages}


def _user(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


def _self_instruct_model(body: dict[str, Any]) -> str | None:
    """Each generation call: one copy of a shown seed (ROUGE-L 1.0) and three new instructions; answers and
    ratings: a fixed answer, rated 5 when its instruction's hash is even, else 3."""
    user = _user(body)
    tag = hashlib.sha256(user.encode()).hexdigest()[:8]
    if "example instructions" in user:
        copy = re.search(r"^1\. (.*)$", user, re.MULTILINE)
        assert copy is not None
        new = [f"Plan task {tag} {i} with " + " ".join(map(str, random.Random(tag + str(i)).sample(range(99), 6)))
               for i in range(3)]
        return json.dumps({"instructions": [copy.group(1), *new]})
    if "rate the accuracy" in user:
        inst = _INSTRUCTION.search(user)
        assert inst is not None
        even = int(hashlib.sha256(inst.group(1).encode()).hexdigest(), 16) % 2 == 0
        return json.dumps({"rating": 5 if even else 3})
    return f"An answer to: {user[:40]}"


SI = {"budget": 7, "baselines": {"new_per_call": 4, "calls_per_round": 2}}


def test_self_instruct_exact_budget_rouge_filter_and_free_rerun(prefect_harness: None, fake_llm: FakeLLMServer,
                                                                tmp_path: Path) -> None:
    shown: list[list[str]] = []

    def model(body: dict[str, Any]) -> str | None:
        if "example instructions" in _user(body):
            shown.append(re.findall(r"^\d+\. (.*)$", _user(body), re.MULTILINE))
        return _self_instruct_model(body)

    fake_llm.responder = model
    settings = settings_for(fake_llm, tmp_path, **SI)
    summary = _baseline("self_instruct", tmp_path, settings)
    pub = _published(tmp_path / "out")
    manifest, train = pub["manifest"], pub["train"]
    requests = len(fake_llm.requests)
    # round 1: 2 calls x 3 new = 6; round 2: 2 calls, 1 more needed; then 7 answers
    assert len(train) == summary.train == 7 and manifest["budget"] == {
        "wanted": 7, "published": 7, "shortfall": 0, "limit": None}
    assert requests == 4 + 7 == manifest["totals"]["calls"]
    assert manifest["method"] == "self_instruct" and manifest["counts"]["instructions_per_round"] == {"1": 6, "2": 1}
    seed_texts = {text for _, text in SEEDS}
    # seeds first (all 4, below seed_demos = 6), then generated ones: none in round 1, generated_demos = 2 after
    assert sorted(len(s) for s in shown) == [4, 4, 6, 6]
    assert all(set(s[:4]) == seed_texts and not set(s[4:]) & seed_texts for s in shown)
    overlaps = [r for r in pub["rejected"] if r.reason == "rouge_overlap"]
    # round 1: both calls' seed copies; round 2: the first call's copy (its first new one completes the pool)
    assert len(overlaps) == 3 and {r.instruction for r in overlaps} <= {s.instruction for s in pub["seeds"]}
    assert all(float(r.detail) >= 0.7 for r in overlaps)
    texts = [s.instruction for s in pub["seeds"]] + [p.instruction for p in train]
    assert all(rouge_l(a, b) < 0.7 for i, a in enumerate(texts) for b in texts[:i])
    for pair in train:
        assert pair.response_source == "strong" and pair.strong_model == "openai/fake-strong"
        assert pair.response == f"An answer to: {answer_messages(pair.instruction)[-1]['content'][:40]}"
        assert pair.seed_ids and set(pair.seed_ids) <= {s for s, _ in SEEDS} and pair.round in (1, 2)
        assert math.isnan(pair.gap) and pair.other_response == ""  # no contrastive scores in a baseline

    _baseline("self_instruct", tmp_path, settings)
    assert len(fake_llm.requests) == requests, "a rerun of a finished baseline made LLM calls"
    again = _published(tmp_path / "out")["train"]
    assert [(p.pair_id, p.response) for p in again] == [(p.pair_id, p.response) for p in train]


def test_self_instruct_shortfall_is_reported(prefect_harness: None, fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    fake_llm.responder = _self_instruct_model
    settings = settings_for(fake_llm, tmp_path, budget=10, baselines={"new_per_call": 4, "calls_per_round": 1,
                                                                       "max_generation_calls": 2})
    _baseline("self_instruct", tmp_path, settings)
    manifest = _published(tmp_path / "out")["manifest"]
    assert manifest["budget"]["published"] == 6 and manifest["budget"]["shortfall"] == 4
    assert "max_generation_calls (2)" in manifest["budget"]["limit"]


def _evol_model(body: dict[str, Any]) -> str | None:
    """Evolutions append a tag to the instruction (the moon seed's first evolution comes back unchanged);
    answers to anything about SQL apologise, the rest answer."""
    user = _user(body)
    found = _INSTRUCTION.search(user)
    if found and ("You rewrite instructions" in str(body["messages"][0]["content"]) or "brand-new" in user):
        parent = found.group(1)
        if "moon" in parent and "step" not in parent:
            return parent
        return f"{parent} Use step {hashlib.sha256(user.encode()).hexdigest()[:6]}."
    if "SQL" in user and body["messages"][0]["content"] == answer_messages("x")[0]["content"]:
        return "Sorry, I cannot help."
    return None


def test_evol_instruct_exact_budget_with_elimination(prefect_harness: None, fake_llm: FakeLLMServer,
                                                     tmp_path: Path) -> None:
    fake_llm.responder = _evol_model
    settings = settings_for(fake_llm, tmp_path, budget=4, baselines={"evol_rounds": 2, "evol_oversample": 2.0})
    _baseline("evol_instruct", tmp_path, settings)
    pub = _published(tmp_path / "out")
    manifest, train = pub["manifest"], pub["train"]
    assert len(train) == 4 and manifest["budget"]["shortfall"] == 0
    # 4 roots, fanout 1, 2 rounds: the moon lineage dies in round 1 (unchanged), so 4 + 3 evolutions
    assert manifest["counts"]["instructions_per_round"] == {"1": 3, "2": 3}
    assert [(r.reason, r.stage) for r in pub["rejected"] if r.reason != "failed_answer"] == [("unchanged", "evol")]
    failed_answers = [r for r in pub["rejected"] if r.reason == "failed_answer"]
    assert all("SQL" in r.instruction for r in failed_answers)
    assert all("SQL" not in p.instruction for p in train)
    assert len(fake_llm.requests) == manifest["totals"]["calls"] == 4 + 3 + 4 + len(failed_answers)
    roots = {s.instruction for s in pub["seeds"]}
    for pair in train:
        assert pair.basic_instruction in roots and pair.instruction.startswith(pair.basic_instruction)
        assert len(pair.actions_applied) == pair.round and set(pair.actions_applied) <= set(METHODS)
    requests = len(fake_llm.requests)
    _baseline("evol_instruct", tmp_path, settings)
    assert len(fake_llm.requests) == requests


def test_evol_shortfall_when_the_pool_runs_out(prefect_harness: None, fake_llm: FakeLLMServer,
                                               tmp_path: Path) -> None:
    fake_llm.responder = _evol_model
    settings = settings_for(fake_llm, tmp_path, budget=6, baselines={"evol_rounds": 2, "evol_oversample": 1.0})
    _baseline("evol_instruct", tmp_path, settings)
    budget = _published(tmp_path / "out")["manifest"]["budget"]
    # every root evolved once per round: 3 + 3 (the moon lineage dies); both SQL evolutions fail at answering
    assert budget["published"] < 6 and budget["shortfall"] == 6 - budget["published"]
    assert "ran out" in budget["limit"]


def test_wizardlm_plus_evolves_codeclm_basic_instructions(prefect_harness: None, fake_llm: FakeLLMServer,
                                                          tmp_path: Path) -> None:
    fake_llm.responder = _evol_model
    settings = settings_for(fake_llm, tmp_path, budget=3, baselines={"evol_rounds": 2, "evol_oversample": 1.0})
    _baseline("wizardlm_plus", tmp_path, settings)
    pub = _published(tmp_path / "out")
    basic = read_records(pub["stages"]["candidates"], Candidate)
    assert len(pub["train"]) == 3 and pub["manifest"]["method"] == "wizardlm_plus"
    assert len(basic) >= 2  # ceil(3 / 2 rounds) roots asked of decode
    by_text = {c.instruction: c for c in basic}
    for pair in pub["train"]:
        root = by_text[pair.basic_instruction]
        assert pair.metadata_id == root.metadata_id and pair.use_case == root.use_case
        assert pair.seed_ids == root.seed_ids
    stages = {s["stage"] for s in pub["manifest"]["stages"]}
    assert {"encode", "decode", "evol", "pairs"} <= stages


def test_alpagasus_keeps_only_high_ratings_at_the_budget(prefect_harness: None, fake_llm: FakeLLMServer,
                                                         tmp_path: Path) -> None:
    fake_llm.responder = _self_instruct_model
    settings = settings_for(fake_llm, tmp_path, budget=5, baselines={
        "new_per_call": 4, "calls_per_round": 2, "alpagasus_oversample": 1.0})
    _baseline("alpagasus", tmp_path, settings)
    pub = _published(tmp_path / "out")
    ratings = read_records(pub["stages"]["ratings"], Rating)
    by_pair = {r.pair_id: r for r in ratings}
    assert len(pub["train"]) == 5 and pub["manifest"]["budget"]["shortfall"] == 0
    assert all(by_pair[p.pair_id].rating >= 4.5 and by_pair[p.pair_id].kept for p in pub["train"])
    low = [r for r in pub["rejected"] if r.reason == "low_rating"]
    assert low and all(float(r.detail) < 4.5 for r in low)
    assert {r.rating for r in ratings} == {5.0, 3.0}
    assert len(ratings) > 5  # rated more than the budget: the first pool did not pass enough, so it was topped up
    # every call once: the top-up pass replays the first pass's calls from the cache (counted as cached)
    assert len(fake_llm.requests) == pub["manifest"]["totals"]["calls"] > pub["manifest"]["totals"]["cached"] > 0
    requests = len(fake_llm.requests)
    _baseline("alpagasus", tmp_path, settings)
    assert len(fake_llm.requests) == requests


# --- CLI -------------------------------------------------------------------------------------------------------

def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODECLM_", "PREFECT_"))}
    env |= {"CODECLM_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect" / "storage"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "codeclm.cli", "baseline", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)


def test_cli_reports_a_shortfall_on_its_last_line_and_bad_input_in_one(fake_llm: FakeLLMServer,
                                                                       tmp_path: Path) -> None:
    fake_llm.responder = _self_instruct_model
    config = tmp_path / "c.toml"
    config.write_text(f'[strong]\nmodel = "openai/fake-strong"\napi_base = "{fake_llm.url}"\n'
                      'output_mode = "json_schema"\n[baselines]\nnew_per_call = 4\ncalls_per_round = 1\n'
                      'max_generation_calls = 1\n')
    done = _cli(tmp_path, "self_instruct", str(_seed_file(tmp_path)), "--out", str(tmp_path / "out"),
                "--config", str(config), "--budget", "5")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("3 self_instruct pairs in ")
    assert "SHORTFALL 2 of 5: max_generation_calls (1) reached" in done.stdout
    assert len(read_records(tmp_path / "out" / "train.parquet", TrainingPair)) == 3

    bad = _cli(tmp_path, "self_instruct", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out2"),
               "--config", str(config))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.jsonl'}: no such file or directory; pass a Parquet, JSONL or CSV file of seeds"]
    assert not (tmp_path / "out2").exists()
    unknown = _cli(tmp_path, "orca", str(_seed_file(tmp_path)), "--out", str(tmp_path / "out3"))
    assert unknown.returncode == 2 and "orca" in unknown.stderr
