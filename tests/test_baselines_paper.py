"""Baselines built as the paper builds them (issue 18, items 4, 5, 6 and 9), end to end on Prefect against the fake
server: WizardLM evolves every seed, WizardLM+ evolves a published CodecLM dataset's basic instructions, the judge
rates Alpagasus' pairs on the original 0-5 accuracy scale, and Tree-Instruct is a method."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import settings_for
from test_baselines import _INSTRUCTION, SEEDS, _cli, _evol_model, _published, _seed_file, _self_instruct_model, _user

from codeclm.baseline_records import METHODS, Rating, baseline_roles, evolution_calls, lineages, seeds_needed
from codeclm.errors import ConfigError, DatasetError
from codeclm.records import Candidate
from codeclm.settings import Settings
from codeclm.storage import read_records
from codeclm.testing.fake_llm import FakeLLMServer
from tasks.respond import answer_messages

pytestmark = pytest.mark.timeout(300, method="thread")

ANSWER_SYSTEM = answer_messages("x")[0]["content"]


def _system(body: dict[str, Any]) -> str:
    return str(body["messages"][0]["content"])


def _kind(body: dict[str, Any]) -> str:
    """Which step a request belongs to, read from its prompt."""
    if "You rewrite instructions for an AI assistant to make them more demanding" in _system(body) or \
            "brand-new" in _user(body):
        return "evol"
    if "semantic tree" in _system(body):
        return "tree"
    if "rate the accuracy" in _user(body):
        return "rate"
    if _system(body) == ANSWER_SYSTEM:
        return "answer"
    return "other"


def _baseline(method: str, tmp_path: Path, settings: Settings, out: str = "out", basic: str | None = None) -> Any:
    from flows.baselines import baseline

    return baseline(method, str(_seed_file(tmp_path)), str(tmp_path / out), settings, basic)


# --- units -------------------------------------------------------------------------------------------------------

def test_seeds_needed_by_each_methods_own_recipe() -> None:
    settings = Settings(budget=2000)
    assert seeds_needed("evol_instruct", settings) == math.ceil(2000 * 1.25 / 4) == 625
    assert seeds_needed("tree_instruct", settings) == 2000  # one rewrite per seed
    for method in ("self_instruct", "alpagasus", "wizardlm_plus", "codeclm", "metadata_only"):
        assert seeds_needed(method, settings) is None, method
    assert "tree_instruct" in METHODS
    # that many seeds is exactly one lineage per seed, as WizardLM evolves them
    cfg = settings.baselines
    assert lineages(625, math.ceil(2000 * cfg.evol_oversample), cfg.evol_rounds) == 1
    assert evolution_calls(625, settings) == 625 * 4
    assert evolution_calls(16, Settings(budget=100)) == 16 * 2 * 4  # 125 wanted: two lineages per seed
    with pytest.raises(ConfigError, match="unknown method 'orca'"):
        seeds_needed("orca", settings)
    assert baseline_roles("alpagasus") == ("strong", "judge") and baseline_roles("tree_instruct") == ("strong",)
    assert settings.baselines.tree_nodes == 10


# --- item 4: WizardLM evolves every seed -------------------------------------------------------------------------

def _record_kinds(server: FakeLLMServer) -> list[str]:
    """Answer as the evolution model and record the kind of every request, in order."""
    kinds: list[str] = []

    def model(body: dict[str, Any]) -> str | None:
        kinds.append(_kind(body))
        return _evol_model(body)

    server.responder = model
    return kinds


def test_evol_instruct_evolves_every_seed_not_the_fewest(prefect_harness: None, fake_llm: FakeLLMServer,
                                                         tmp_path: Path) -> None:
    """Budget 2 from 4 seeds over 2 rounds: the old plan evolved one root; every seed is evolved now."""
    kinds = _record_kinds(fake_llm)
    settings = settings_for(fake_llm, tmp_path, budget=2, baselines={"evol_rounds": 2, "evol_oversample": 1.0})
    _baseline("evol_instruct", tmp_path, settings)
    pub = _published(tmp_path / "out")
    # round 1: 4 evolutions (the moon's comes back unchanged and its lineage ends), round 2: the 3 survivors
    assert kinds.count("evol") == 4 + 3 and set(kinds) <= {"evol", "answer"}
    assert pub["manifest"]["counts"]["instructions_per_round"] == {"1": 3, "2": 3}
    assert {i.root_instruction for i in pub["instructions"]} == {t for s, t in SEEDS if s != "s-moon"}
    assert len(pub["train"]) == 2 and pub["manifest"]["budget"]["shortfall"] == 0


def test_evol_instruct_with_too_few_seeds_starts_lineages_of_equal_generations(
        prefect_harness: None, fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """Budget 20 from 4 seeds over 2 rounds: 3 lineages per seed, distinct methods in round 1, then one evolution
    per instruction per round, so round 2 is as large as round 1 (no tree doubling); the pool runs out: shortfall."""
    kinds = _record_kinds(fake_llm)
    settings = settings_for(fake_llm, tmp_path, budget=20, baselines={"evol_rounds": 2, "evol_oversample": 1.0})
    _baseline("evol_instruct", tmp_path, settings)
    pub = _published(tmp_path / "out")
    assert kinds.count("evol") == 4 * 3 + 3 * 3  # moon's 3 lineages die in round 1
    assert pub["manifest"]["counts"]["instructions_per_round"] == {"1": 9, "2": 9}
    first = [i for i in pub["instructions"] if i.round == 1]
    for root in {i.root_instruction for i in first}:
        methods = [i.evolutions[0] for i in first if i.root_instruction == root]
        assert len(methods) == len(set(methods)) == 3, root
    second = [i for i in pub["instructions"] if i.round == 2]
    assert sorted(i.parent_id for i in second) == sorted(i.instruction_id for i in first)  # one child each
    # the 6 SQL instructions fail the answer check: 12 pairs of 20, reported
    budget = pub["manifest"]["budget"]
    assert budget["published"] == 12 and budget["shortfall"] == 8 and "ran out" in budget["limit"]


# --- item 5: WizardLM+ from a published CodecLM dataset ---------------------------------------------------------

def _codeclm_dataset(tmp_path: Path, fake_llm: FakeLLMServer) -> Path:
    from flows.generate import generate

    settings = settings_for(fake_llm, tmp_path, n_metadata=2, instructions_per_metadata=2, n_rubrics=2,
                            max_rounds=2, budget=3, batch_size=10)
    out = tmp_path / "codeclm"
    generate(str(_seed_file(tmp_path)), str(out), settings)
    return out


def test_wizardlm_plus_evolves_the_basic_instructions_of_a_codeclm_dataset(
        prefect_harness: None, fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    data = _codeclm_dataset(tmp_path, fake_llm)
    basic = [c for c in read_records(data / "stages" / "candidates.parquet", Candidate) if c.round == 1]
    assert basic
    kinds = _record_kinds(fake_llm)
    settings = settings_for(fake_llm, tmp_path, budget=2, baselines={"evol_rounds": 2, "evol_oversample": 1.0})
    _baseline("wizardlm_plus", tmp_path, settings, basic=str(data))
    pub = _published(tmp_path / "out")
    # the roots: a seeded sample of the basic instructions, as many as Evol-Instruct's recipe evolves
    # (budget x evol_oversample / evol_rounds = 1), not all of CodecLM's oversampled set
    roots = read_records(pub["stages"]["candidates"], Candidate)
    assert len(basic) > 1 and len(roots) == 1 and roots[0].instruction_id in {c.instruction_id for c in basic}
    # no encode, decode or rubrics call: the root evolved twice (its two generations), then 2 answers
    assert kinds.count("evol") == 2 * len(roots) and kinds.count("answer") == 2 and set(kinds) == {"evol", "answer"}
    assert {i.root_instruction for i in pub["instructions"]} == {c.instruction for c in roots}
    by_text = {c.instruction: c for c in basic}
    for pair in pub["train"]:
        root = by_text[pair.basic_instruction]
        assert (pair.metadata_id, pair.use_case, pair.skills, pair.seed_ids) == (
            root.metadata_id, root.use_case, root.skills, root.seed_ids)
    manifest = pub["manifest"]
    assert manifest["run"]["basic"] == str(data) and not {"encode", "decode"} & {s["stage"] for s in manifest["stages"]}
    assert "metadata" not in pub["stages"]
    before = len(kinds)
    _baseline("wizardlm_plus", tmp_path, settings, basic=str(data))
    assert len(kinds) == before, "a rerun made LLM calls"


def test_basic_folder_that_is_not_a_codeclm_dataset_stops_in_one_line(
        prefect_harness: None, fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    settings = settings_for(fake_llm, tmp_path, budget=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"not a CodecLM dataset folder .*: no readable manifest.json"):
        _baseline("wizardlm_plus", tmp_path, settings, basic=str(empty))
    other = tmp_path / "si"
    (other / "stages").mkdir(parents=True)
    (other / "manifest.json").write_text(json.dumps({"method": "self_instruct"}))
    with pytest.raises(DatasetError, match="its manifest says method 'self_instruct', not 'codeclm'"):
        _baseline("wizardlm_plus", tmp_path, settings, basic=str(other))
    (other / "manifest.json").write_text(json.dumps({"method": "codeclm"}))
    with pytest.raises(DatasetError, match=r"stages/candidates\.parquet is missing"):
        _baseline("wizardlm_plus", tmp_path, settings, basic=str(other))
    with pytest.raises(ConfigError, match="--basic is for wizardlm_plus only"):
        _baseline("evol_instruct", tmp_path, settings, basic=str(other))
    assert not fake_llm.requests and not (tmp_path / "out").exists()

    done = _cli(tmp_path, "wizardlm_plus", str(_seed_file(tmp_path)), "--out", str(tmp_path / "out"), "--basic",
                str(empty))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: --basic {empty}: not a CodecLM dataset folder (what `codeclm generate` writes): no readable "
        "manifest.json"]


# --- item 6: Alpagasus rated by the judge, the original filter's scale ------------------------------------------

def test_alpagasus_is_rated_by_the_judge_on_the_original_scale(prefect_harness: None, fake_llm: FakeLLMServer,
                                                               tmp_path: Path) -> None:
    """A plain-text judge answers the score alone on its first line, then why; 4.5 stays, 4 goes. The strong
    model writes and answers but never rates."""
    rating_requests: list[dict[str, Any]] = []

    def model(body: dict[str, Any]) -> str | None:
        if _kind(body) == "rate":
            rating_requests.append(body)
            found = _INSTRUCTION.search(_user(body))
            assert found is not None
            even = int(hashlib.sha256(found.group(1).encode()).hexdigest(), 16) % 2 == 0
            return "4.5\nThe answer is accurate." if even else "4\nMostly accurate, one slip."
        return _self_instruct_model(body)

    fake_llm.responder = model
    settings = settings_for(fake_llm, tmp_path, budget=4, baselines={
        "new_per_call": 4, "calls_per_round": 2, "alpagasus_oversample": 1.0})
    settings.judge.output_mode = "text"
    _baseline("alpagasus", tmp_path, settings)
    pub = _published(tmp_path / "out")
    ratings = read_records(pub["stages"]["ratings"], Rating)
    assert len(rating_requests) == len(ratings) > 4
    assert {b["model"] for b in rating_requests} == {"fake-judge"}
    assert all(b.get("temperature") == 0 and "response_format" not in b for b in rating_requests)
    prompt = _user(rating_requests[0])
    assert "scale of 0 to 5" in prompt and "accuracy" in prompt and "single line containing only the score" in prompt
    assert {r.rating for r in ratings} == {4.5, 4.0} and all(r.model == "openai/fake-judge" for r in ratings)
    kept = {r.pair_id for r in ratings if r.kept}
    assert len(pub["train"]) == 4 and {p.pair_id for p in pub["train"]} <= kept
    assert all(r.rating == 4.5 for r in ratings if r.kept)
    assert {r.detail for r in pub["rejected"] if r.reason == "low_rating"} == {"4"}
    strong = [r for r in fake_llm.requests if r["model"] == "fake-strong"]
    assert len(strong) + len(rating_requests) == len(fake_llm.requests)


# --- item 9: Tree-Instruct ---------------------------------------------------------------------------------------

def _tree_model(kinds: list[str], prompts: list[str]) -> Any:
    """Tree rewrites: the three sections, the new instruction = the seed plus a tag (the moon seed's first rewrite
    comes back unchanged); answers: the fake server's own text."""

    def model(body: dict[str, Any]) -> str | None:
        kind = _kind(body)
        kinds.append(kind)
        if kind != "tree":
            return None
        user = _user(body)
        prompts.append(user)
        found = _INSTRUCTION.search(user)
        assert found is not None
        seed = found.group(1)
        new = seed if "moon" in seed and "This is rewrite" not in user else \
            f"{seed} Cover case {hashlib.sha256(user.encode()).hexdigest()[:6]} and explain each step."
        return ("Semantic tree:\n- task\n  - object\nEnlarged tree:\n- task\n  - object\n  - case\n"
                f"New instruction:\n{new}")

    return model


def test_tree_instruct_samples_seeds_one_call_each_and_reruns_free(prefect_harness: None, fake_llm: FakeLLMServer,
                                                                   tmp_path: Path) -> None:
    kinds: list[str] = []
    prompts: list[str] = []
    fake_llm.responder = _tree_model(kinds, prompts)
    settings = settings_for(fake_llm, tmp_path, budget=2)
    summary = _baseline("tree_instruct", tmp_path, settings)
    pub = _published(tmp_path / "out")
    # more seeds than pairs: a seeded sample of 2 seeds (neither the moon, here), one call each, then 2 answers
    assert kinds.count("tree") == 2 and kinds.count("answer") == 2 and len(kinds) == 4
    assert all("Add 10 new nodes" in p and "This is rewrite" not in p for p in prompts)
    manifest = pub["manifest"]
    assert summary.train == 2 and manifest["method"] == "tree_instruct" and manifest["budget"]["shortfall"] == 0
    assert "tree_instruct" in manifest["prompts"] and manifest["counts"]["instructions_per_round"] == {"1": 2}
    assert manifest["totals"]["calls"] == 4 and {s["stage"] for s in manifest["stages"]} == {"tree_instruct", "pairs"}
    seeds = dict(SEEDS)
    for pair in pub["train"]:
        assert pair.actions_applied == ["tree+10"] and pair.round == 1 and pair.response_source == "strong"
        assert pair.basic_instruction == seeds[pair.seed_ids[0]] and pair.instruction.startswith(pair.basic_instruction)
    requests = len(fake_llm.requests)
    _baseline("tree_instruct", tmp_path, settings)
    assert len(fake_llm.requests) == requests, "a rerun of a finished baseline made LLM calls"


def test_tree_instruct_with_fewer_seeds_rewrites_each_again_and_replaces_eliminated(
        prefect_harness: None, fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """Budget 6 from 4 seeds: each seed at most twice (ceil(6 / 4)); the moon's first rewrite comes back unchanged
    and is replaced by one more second rewrite: 7 tree calls, 6 answers."""
    kinds: list[str] = []
    prompts: list[str] = []
    fake_llm.responder = _tree_model(kinds, prompts)
    settings = settings_for(fake_llm, tmp_path, budget=6, baselines={"tree_nodes": 3})
    _baseline("tree_instruct", tmp_path, settings)
    pub = _published(tmp_path / "out")
    assert kinds.count("tree") == 7 and kinds.count("answer") == 6 and len(fake_llm.requests) == 13
    assert all("Add 3 new nodes" in p for p in prompts)
    assert sum("This is rewrite 2" in p for p in prompts) == 3
    assert [(r.reason, r.stage) for r in pub["rejected"]] == [("unchanged", "tree_instruct")]
    train = pub["train"]
    assert len(train) == 6 and pub["manifest"]["budget"]["shortfall"] == 0
    per_seed = [sum(p.seed_ids == [s] for p in train) for s, _ in SEEDS]
    assert max(per_seed) == 2 and sum(per_seed) == 6 and all(p.actions_applied == ["tree+3"] for p in train)
