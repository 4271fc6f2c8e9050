"""Issue 10's defects, one test each (no Prefect engine): what the paper states, against the steps themselves.

The decode and encode steps run against the real loopback server; the rest are the steps' own logic.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import settings_for

from codeclm.benchmarks import load_benchmark
from codeclm.errors import ConfigError
from codeclm.eval.evaluation import plan_evaluation
from codeclm.records import Candidate, Metadata, RejectedCandidate, Seed, TrainingPair
from codeclm.settings import Settings
from codeclm.storage import load_seeds, read_records, write_records
from codeclm.testing.fake_llm import FakeLLMServer
from tasks._base import ref_to
from tasks.encode import metadata_of

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "benchmarks"
BENCHMARK_FILES = ("vicuna_80.jsonl", "self_instruct_252.jsonl", "koala_180.jsonl", "evol_instruct_218.jsonl")


# --- 1. large budgets: decode asks over several calls of at most the schema's cap ---------------------------


class DecodeModel:
    """Answers a decode prompt with exactly the number of instructions it asks for, and keeps every prompt."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> str:
        user = body["messages"][-1]["content"]
        with self.lock:
            self.prompts.append(user)
        n = int(re.search(r"Write (\d+)", user)[1])
        use_case = re.search(r"Use case of the instructions: (.*)", user)[1]
        part = len(re.findall(r"^\d+\. ", user, re.MULTILINE)) // n + 1  # earlier parts are listed in the prompt
        items = [f"Task {i} of part {part} about {use_case}." for i in range(1, n + 1)]
        if body.get("response_format"):
            return json.dumps({"instructions": items})
        return "\n".join(f"{i}. {text}" for i, text in enumerate(items, start=1))


@pytest.mark.parametrize("output_mode", ["json_schema", "text"])
def test_a_budget_above_the_schema_cap_is_decoded_over_several_calls(tmp_path: Path, output_mode: str) -> None:
    from tasks.decode import call_sizes, decode

    model = DecodeModel()
    with FakeLLMServer(responder=model) as server:
        settings = settings_for(server, tmp_path, budget=8000, output_mode=output_mode)
        per_metadata = settings.per_metadata(200)  # the paper's 8,000-pair point (Fig. 5) with 200 metadata
        assert per_metadata == 80 and call_sizes(per_metadata) == [40, 40]
        metas = [metadata_of(f"use case {i}", ["skill"], "seed", ["s1"]) for i in range(2)]
        meta_ref = ref_to(write_records(tmp_path / "meta.parquet", metas, Metadata))
        seed_ref = ref_to(write_records(tmp_path / "seeds.parquet", [Seed(seed_id="s1", instruction="x")], Seed))
        out = decode.fn(meta_ref, [seed_ref], settings, per_metadata, batch="000")
    candidates = read_records(Path(out["candidates"]["path"]), Candidate)
    by_meta = Counter(c.metadata_id for c in candidates)
    assert by_meta == {m.metadata_id: 80 for m in metas}
    assert len({c.instruction for c in candidates}) == 160
    assert len(model.prompts) == 4  # two calls per metadata, 40 instructions each
    assert sorted(int(re.search(r"Write (\d+)", p)[1]) for p in model.prompts) == [40] * 4
    second = [p for p in model.prompts if "already written" in p]
    assert len(second) == 2 and all("Task 40 of part 1 about" in p for p in second)


def test_call_sizes_are_even_and_within_the_cap() -> None:
    from tasks.decode import call_sizes

    assert call_sizes(1) == [1] and call_sizes(50) == [50] and call_sizes(51) == [26, 25]
    assert call_sizes(120) == [40, 40, 40]
    for n in range(1, 400):
        sizes = call_sizes(n)
        assert sum(sizes) == n and max(sizes) <= 50 and max(sizes) - min(sizes) <= 1


# --- 3. one reader for seeds and benchmark questions ----------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARK_FILES)
def test_every_benchmark_file_is_a_seed_file_read_like_its_questions(name: str, tmp_path: Path) -> None:
    seeds = load_seeds(SHARED / name)
    questions = load_benchmark(str(SHARED / name), cache_dir=tmp_path)
    assert [(s.seed_id, s.instruction) for s in seeds] == [(q.question_id, q.prompt.strip()) for q in questions]


def test_self_instruct_seeds_keep_the_instance_input() -> None:
    rows = [json.loads(line) for line in (SHARED / "self_instruct_252.jsonl").read_text().splitlines()]
    seeds = {s.seed_id: s.instruction for s in load_seeds(SHARED / "self_instruct_252.jsonl")}
    with_input = [r for r in rows if r["instances"][0]["input"].strip()]
    assert with_input
    for row in with_input:
        assert seeds[row["id"]] == f"{row['instruction']} Input: {row['instances'][0]['input']}".strip()


def test_a_vicuna_parquet_copy_reads_its_turns(tmp_path: Path) -> None:
    """From Parquet the turns are a numpy array, not a list: the same rule reads them."""
    path = tmp_path / "vicuna.parquet"
    pd.read_json(SHARED / "vicuna_80.jsonl", lines=True).to_parquet(path, index=False)
    assert load_seeds(path) == load_seeds(SHARED / "vicuna_80.jsonl")


# --- 4. text mode keeps `max_skills` skills, not a hard-coded 3 --------------------------------------------


@pytest.mark.parametrize("max_skills", [2, 5])
def test_text_mode_encode_keeps_max_skills(tmp_path: Path, max_skills: int) -> None:
    from tasks.encode import encode

    listed = "python, file io, memory management, streaming, unit testing, profiling"
    with FakeLLMServer(responder=lambda body: f"Use case: code help\nSkills: {listed}") as server:
        settings = settings_for(server, tmp_path, output_mode="text", max_skills=max_skills)
        seeds = ref_to(write_records(tmp_path / "s.parquet", [Seed(seed_id="s1", instruction="Fix my code.")], Seed))
        out = encode.fn(seeds, settings, batch="000")
    (meta,) = read_records(Path(out["metadata"]["path"]), Metadata)
    assert meta.skills == sorted(s.strip() for s in listed.split(", ")[:max_skills])


# --- 5. augmentation mixes across instructions, following the seeds' distribution -------------------------


def _skewed_seeds() -> list[Metadata]:
    """Six seeds share the use case 'question answering', three others have one each; every seed its own skills."""
    seeds = [metadata_of("question answering", [f"qa {i} a", f"qa {i} b"], "seed", [f"qa{i}"]) for i in range(6)]
    return seeds + [metadata_of(u, [f"{u} a", f"{u} b", f"{u} c"], "seed", [u]) for u in ("poem", "code", "travel")]


def test_augmented_use_cases_follow_the_seeds_distribution() -> None:
    from tasks.augment import mix_and_match

    shares = []
    for seed in range(5):
        pool = mix_and_match(_skewed_seeds(), target=60, max_skills=3, seed=seed)
        augmented = [m for m in pool if m.origin == "augmented"]
        assert len(pool) == 60
        shares.append(sum(m.use_case == "question answering" for m in augmented) / len(augmented))
    # six seeds in nine: about two thirds (a little less: its pairs repeat more often); uniform would be a quarter
    assert min(shares) > 0.5, shares


def test_augmentation_never_pairs_a_use_case_with_skills_of_its_own_seeds() -> None:
    from tasks.augment import mix_and_match

    seeds = _skewed_seeds()
    own = {u: {s for m in seeds if m.use_case == u for s in m.skills} for u in {m.use_case for m in seeds}}
    for seed in range(5):
        for meta in mix_and_match(seeds, target=60, max_skills=3, seed=seed):
            if meta.origin == "augmented":
                assert not set(meta.skills) & own[meta.use_case], meta


# --- 6. duplicate removal is global across batches, and a setting --------------------------------------------


def _candidates(path: Path, texts: list[str], meta: str) -> Any:
    rows = [Candidate(candidate_id=f"cand-{meta}-{i}", instruction_id=f"inst-{meta}-{i}", metadata_id=meta,
                      seed_ids=["s"], use_case="u", skills=["k"], round=1, instruction=t, basic_instruction=t,
                      actions_applied=[]) for i, t in enumerate(texts)]
    return ref_to(write_records(path, rows, Candidate))


def test_dedup_drops_repeats_within_and_across_batches(tmp_path: Path) -> None:
    from tasks.dedup import dedup

    settings = Settings(home=tmp_path / "home")
    first = _candidates(tmp_path / "a.parquet", ["Name three rivers.", "Explain tides.", "name  three RIVERS."], "a")
    second = _candidates(tmp_path / "b.parquet", ["Explain Tides.", "Plan a picnic."], "b")
    out = dedup.fn([first, second], settings, 2)
    kept = [[c.instruction for c in read_records(Path(ref["path"]), Candidate)] for ref in out["candidates"]]
    (rejected,) = out["rejected"]
    assert kept == [["Name three rivers.", "Explain tides."], ["Plan a picnic."]]
    assert [(r.instruction_id, r.reason) for r in read_records(Path(rejected["path"]), RejectedCandidate)] == [
        ("inst-a-2", "duplicate"), ("inst-b-0", "duplicate")]


def test_duplicate_removal_is_a_setting() -> None:
    assert Settings().drop_duplicates is True
    assert Settings(drop_duplicates=False).drop_duplicates is False
    assert Settings(preset="paper").drop_duplicates is False  # the paper describes no duplicate removal


# --- 7. train.jsonl holds the messages the answer was generated under --------------------------------------


def test_train_jsonl_messages_are_what_was_answered() -> None:
    from tasks.export import chat_rows
    from tasks.respond import answer_calls

    pair = TrainingPair(
        pair_id="pair-1", instruction="Plan a picnic for six.", response="Bring bread.", response_source="strong",
        other_response="o", instruction_id="inst-1", candidate_id="cand-1", seed_ids=["s"], metadata_id="m",
        use_case="u", skills=["k"], basic_instruction="b", actions_applied=[], round=1, strong_model="s",
        target_model="t", strong_score_first=9, strong_score_second=9, target_score_first=2, target_score_second=2,
        gap=7,
        decision="keep_strong")
    (call,) = answer_calls([("cand-1", pair.instruction)], "strong", "respond")
    (row,) = chat_rows([pair])
    assert row["messages"] == [*call.messages, {"role": "assistant", "content": "Bring bread."}]
    assert row["messages"][0]["role"] == "system"


# --- 9. max_tokens: 2048 (A.3, LLaMA runs); the demo keeps its small values --------------------------------


def test_max_tokens_default_is_the_papers_2048_and_the_demo_keeps_its_own() -> None:
    assert {Settings().role(r).max_tokens for r in ("strong", "target", "judge")} == {2048}
    paper = Settings(preset="paper")
    assert (paper.strong.max_tokens, paper.target.max_tokens) == (2048, 2048)
    demo = Settings.load(ROOT / "data" / "demo.toml")
    assert (demo.strong.max_tokens, demo.target.max_tokens, demo.judge.max_tokens) == (128, 64, 96)


# --- 10. the CRR rule is a setting ------------------------------------------------------------------------


def test_the_rule_can_be_set_in_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'rule = "alpagasus"\nhome = "{tmp_path / "home"}"\n')
    settings = Settings.load(config)
    assert settings.rule == "alpagasus"
    questions = str(ROOT / "data" / "eval_questions.jsonl")
    assert plan_evaluation([questions], settings, limit=1).rule == "alpagasus"
    assert plan_evaluation([questions], settings, limit=1, rule="codeclm").rule == "codeclm"  # --rule wins
    config.write_text('rule = "majority"\n')
    with pytest.raises(ConfigError, match="invalid setting rule"):
        Settings.load(config)


# --- 11. a small budget decodes budget x oversample instructions, not one per metadata ---------------------


def test_a_small_budget_samples_the_metadata_down(tmp_path: Path) -> None:
    from tasks.augment import augment

    settings = Settings(home=tmp_path / "home", budget=30, oversample=2.0)
    originals = [metadata_of(f"use case {i}", [f"skill {i}", f"other {i}"], "seed", [f"s{i}"]) for i in range(30)]
    refs = [ref_to(write_records(tmp_path / "m.parquet", originals, Metadata))]
    out = augment.fn(refs, settings, n_batches=2)
    used = [m for ref in out for m in read_records(Path(ref["path"]), Metadata)]
    assert len(used) == 60 == settings.metadata_to_decode(200)  # 200 metadata, but 60 instructions wanted
    assert settings.per_metadata(len(used)) == 1 and len({m.metadata_id for m in used}) == 60
    assert used == [m for ref in augment.fn(refs, settings, n_batches=2) for m in read_records(Path(ref["path"]),
                                                                                            Metadata)]


def test_metadata_to_decode() -> None:
    assert Settings().metadata_to_decode(200) == 200  # 2,000 pairs x 2 = 4,000 instructions: every metadata
    assert Settings(budget=30).metadata_to_decode(200) == 60
    assert Settings(budget=30, instructions_per_metadata=1).metadata_to_decode(200) == 200  # asked for explicitly


# --- presets --------------------------------------------------------------------------------------------------


def test_paper_preset_states_the_papers_settings() -> None:
    from codeclm.settings import PRESETS

    paper = Settings(preset="paper")
    expected = {"n_metadata": 200, "max_skills": 3, "n_rubrics": 4, "max_rounds": 4, "threshold": 3.0,
                "budget": 2000, "scorer": "strong", "rule": "codeclm", "keep_target_when_better": True}
    assert {k: getattr(paper, k) for k in expected} == expected
    assert (paper.strong.temperature, paper.judge.temperature) == (0.7, 0.0)
    for key, value in PRESETS["paper"].items():
        got = paper.role(key).model_dump(include=set(value)) if isinstance(value, dict) else getattr(paper, key)
        assert got == value, key


def test_default_preset_is_the_field_defaults() -> None:
    assert Settings(preset="default").model_dump(exclude={"preset"}) == Settings().model_dump(exclude={"preset"})


def test_config_env_and_flags_win_over_the_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('preset = "paper"\nbudget = 500\n[strong]\nmodel = "openai/x"\nmax_tokens = 300\n')
    settings = Settings.load(config)
    assert (settings.preset, settings.budget, settings.drop_duplicates) == ("paper", 500, False)
    assert (settings.strong.model, settings.strong.max_tokens, settings.strong.temperature) == ("openai/x", 300, 0.7)
    assert Settings.load(config, budget=7).budget == 7  # a CLI flag
    assert Settings.load(config, preset="default").drop_duplicates is True  # --preset over the file's preset
    monkeypatch.setenv("CODECLM_MAX_ROUNDS", "2")
    monkeypatch.setenv("CODECLM_TARGET__MAX_TOKENS", "100")
    from_env = Settings.load(config)
    assert (from_env.max_rounds, from_env.target.max_tokens, from_env.target.temperature) == (2, 100, 0.7)
    monkeypatch.setenv("CODECLM_PRESET", "paper")
    assert Settings().drop_duplicates is False


def test_a_preset_survives_a_parameter_round_trip() -> None:
    """Prefect passes settings as their JSON dump; reading it back must not re-apply the preset over values."""
    settings = Settings(preset="paper", budget=5, drop_duplicates=True)
    assert Settings(**settings.model_dump(mode="json")) == settings


def test_an_unknown_preset_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('preset = "papers"\n')
    with pytest.raises(ConfigError, match="invalid setting preset"):
        Settings.load(config)
