"""Issue #10, defect 2 and Table 3, against the fake server and real Prefect: `generate` tops up until the budget
is met (or says loudly why not), and the two ablations (metadata only; no Contrastive Filtering) run in the
same engine with exact counts."""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import settings_for
from test_generate_flow import _check_published

from codeclm.records import TrainingPair
from codeclm.results import DatasetResult
from codeclm.storage import read_records
from codeclm.testing.fake_llm import FakeLLMServer

SEEDS = [("s1", "Plan a picnic for six people."), ("s2", "Explain tides to a child."),
         ("s3", "Write a haiku about autumn."), ("s4", "Summarise the causes of inflation.")]
BASE = {"n_metadata": 2, "n_rubrics": 2, "max_rounds": 1, "batch_size": 10, "drop_duplicates": True}


def _seeds(tmp_path: Path) -> Path:
    path = tmp_path / "seeds.jsonl"
    pd.DataFrame(SEEDS, columns=["seed_id", "instruction"]).to_json(path, orient="records", lines=True)
    return path


def _user(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


def _system(body: dict[str, Any]) -> str:
    return str(body["messages"][0]["content"])


def _stage(body: dict[str, Any]) -> str:
    system = _system(body)
    if "checking the quality of an answer" in system:
        return "score"
    if "helpful, accurate assistant" in system:
        return "respond"
    if "improve instructions" in system:
        return "improve"
    if "write instructions" in system:
        return "decode"
    return "other"


class Model:
    """Answers name their model; scoring follows `gap`: strong scores 5 + gap/2, the target 5 - gap/2, so the
    strong model wins by `gap` in both orders. Decode writes distinct numbered instructions."""

    def __init__(self, gap: float, max_items: int = 50) -> None:
        self.gap, self.max_items = gap, max_items
        self.decoded = 0
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, str]] = []  # (stage, model, user message) of every request

    def __call__(self, body: dict[str, Any]) -> str | None:
        with self.lock:
            return self._answer(body)

    def _answer(self, body: dict[str, Any]) -> str | None:
        stage = _stage(body)
        self.log.append((stage, str(body["model"]), _user(body)))
        if stage == "respond":
            return f"[{body['model']}] An answer to: {_user(body)[:60]}"
        if stage == "score":
            first = re.search(r"Assistant 1's Answer\]\s*<answer>\s*(.*?)\s*</answer>", _user(body), re.S)
            strong_first = first is not None and first[1].startswith("[fake-strong]")
            high, low = 5 + self.gap / 2, 5 - self.gap / 2
            one, two = (high, low) if strong_first else (low, high)
            return json.dumps({"score_1": one, "score_2": two})
        if stage == "decode":
            n = min(self.max_items, int(re.search(r"Write (\d+)", _user(body))[1]))
            items = []
            for _ in range(n):
                self.decoded += 1
                items.append(f"Distinct task number {self.decoded}.")
            if body.get("response_format"):
                return json.dumps({"instructions": items})
            return "\n".join(f"{i}. {text}" for i, text in enumerate(items, start=1))
        return None


def _generate(seeds: Path, out: Path, settings: Any, method: str = "codeclm") -> DatasetResult:
    from flows.baselines import baseline
    from flows.generate import generate

    if method == "codeclm":
        return generate(str(seeds), str(out), settings)
    return baseline(method, str(seeds), str(out), settings)


def test_generate_tops_up_until_the_budget_is_met(prefect_harness: None, fake_llm: FakeLLMServer,
                                                  tmp_path: Path) -> None:
    """Budget 6 at oversample 1 asks 3 basic instructions of each of 2 metadata, but the model writes at most 2 per
    call; every candidate is kept (the strong answer wins by 8), so the first pass keeps 4 of 6: one top-up pass
    asks for ceil(2 / 1 x 1.1 / 2) = 2 more per metadata, 8 kept in all, sampled down to exactly 6."""
    model = Model(gap=8, max_items=2)
    fake_llm.responder = model
    settings = settings_for(fake_llm, tmp_path, **BASE, budget=6, oversample=1.0)
    out = tmp_path / "out"
    summary = _generate(_seeds(tmp_path), out, settings)
    pub = _check_published(out)
    manifest = pub["manifest"]
    assert summary.train == len(pub["train.parquet"]) == 6
    assert manifest["budget"] == {"wanted": 6, "published": 6, "shortfall": 0, "topup_passes": 1, "limit": None}
    assert manifest["counts"]["basic_instructions"] == 4 + 4
    assert manifest["counts"]["rejected"] == {"over_budget": 2}
    decodes = [user for stage, _, user in model.log if stage == "decode"]
    assert len(decodes) == 4  # 2 metadata x (first pass + one top-up)
    topups = [user for user in decodes if "already written" in user]
    assert len(topups) == 2 and all("Write 2 more" in user for user in topups)
    # the top-up prompt shows what the first pass wrote for the same metadata, so the model writes new ones
    assert all(re.search(r"^1\. Distinct task number \d+", user, re.M) for user in topups)

    fake_llm.reset()
    again = _generate(_seeds(tmp_path), out, settings)
    assert again.train == 6 and fake_llm.requests == []  # a rerun replays every pass from the caches


@pytest.mark.slow  # ~25 s: two top-up passes
def test_a_shortfall_is_published_loudly(prefect_harness: None, fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """Equal scores keep nothing: after `max_topups` passes the dataset is published short, and the manifest,
    the log and the CLI's exit line say so with the limit that was reached."""
    from codeclm.cli import _shortfall_note

    fake_llm.responder = Model(gap=0)
    settings = settings_for(fake_llm, tmp_path, **BASE, budget=4, max_topups=2, keep_target_when_better=False)
    out = tmp_path / "out"
    try:
        _generate(_seeds(tmp_path), out, settings)
    except Exception as exc:  # nothing kept and nothing to publish is refused
        raise AssertionError("a run with rejections publishes its (empty) train set") from exc
    manifest = json.loads((out / "manifest.json").read_text())
    budget = manifest["budget"]
    assert budget == {"wanted": 4, "published": 0, "shortfall": 4, "topup_passes": 2,
                      "limit": "max_topups (2) reached"}
    # first pass: budget 4 x oversample 2 over 2 metadata = 4 each; each top-up: ceil(4 x 2 x 1.1 / 2) = 5 each
    assert manifest["counts"]["basic_instructions"] == 8 + 10 + 10
    assert manifest["counts"]["rejected"] == {"below_threshold": 28}
    def note(budget: dict[str, Any]) -> str:
        return _shortfall_note(DatasetResult(out="o", method="codeclm", train=0, budget=budget, counts={}, stages=[],
                                             totals={}))

    assert note(budget) == "; SHORTFALL 4 of 4: max_topups (2) reached"
    assert note({**budget, "shortfall": 0}) == ""


def test_metadata_only_ablation_answers_basic_instructions_with_the_strong_model(
        prefect_harness: None, fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """Table 3 row 2: no Self-Rubrics, no Contrastive Filtering. Budget 4 at oversample 1 over 2 metadata: 2
    basic instructions each, each answered once by the strong model, never by the target, never scored."""
    model = fake_llm.responder = Model(gap=8)
    settings = settings_for(fake_llm, tmp_path, **BASE, budget=4)
    out = tmp_path / "out"
    summary = _generate(_seeds(tmp_path), out, settings, "metadata_only")
    manifest = json.loads((out / "manifest.json").read_text())
    train = read_records(out / "train.parquet", TrainingPair)
    stages = Counter(stage for stage, _, _ in model.log)
    assert summary.train == len(train) == 4 and manifest["method"] == "metadata_only"
    assert manifest["budget"]["shortfall"] == 0 and manifest["settings"]["contrastive_filtering"] is False
    assert stages["score"] == stages["improve"] == 0 and stages["respond"] == 4 and stages["decode"] == 2
    assert not [r for r in fake_llm.requests if r["model"] == "fake-target"]
    assert {(p.round, p.decision, p.response_source, p.other_response) for p in train} == {
        (1, "keep_strong", "strong", "")}
    assert all(math.isnan(p.gap) and p.response.startswith("[fake-strong]") for p in train)
    assert all(p.instruction == p.basic_instruction and p.actions_applied == [] for p in train)


@pytest.mark.slow  # ~25 s; the metadata-only test covers the same path in the default suite
def test_no_contrastive_filtering_ablation_improves_every_round_then_answers_once(
        prefect_harness: None, fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """Table 3 row 3: Self-Rubrics through all 3 rounds without filtering in between, then one strong answer to
    the last instruction: 4 basic instructions x 2 improve calls, 4 answers, no scores, no target."""
    model = fake_llm.responder = Model(gap=0)  # equal scores would reject everything if anything were filtered
    settings = settings_for(fake_llm, tmp_path, **{**BASE, "max_rounds": 3}, budget=4)
    out = tmp_path / "out"
    summary = _generate(_seeds(tmp_path), out, settings, "no_contrastive_filtering")
    train = read_records(out / "train.parquet", TrainingPair)
    stages = Counter(stage for stage, _, _ in model.log)
    assert summary.train == len(train) == 4
    assert (stages["improve"], stages["respond"], stages["score"]) == (8, 4, 0)
    assert not [r for r in fake_llm.requests if r["model"] == "fake-target"]
    assert {(p.round, len(p.actions_applied), p.decision) for p in train} == {(3, 2, "keep_strong")}
    assert all(p.instruction != p.basic_instruction for p in train)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["candidates_per_round"] == {"1": 4, "2": 4, "3": 4}


@pytest.mark.slow  # ~25 s
def test_topping_up_stops_when_the_model_writes_nothing_new(prefect_harness: None, fake_llm: FakeLLMServer,
                                                            tmp_path: Path) -> None:
    """A model that decodes the same instruction every time: the top-up's instructions are all repeats, so the
    run stops after one pass instead of paying for the rest, and says why."""
    codec = Model(gap=8)

    def repeating(body: dict[str, Any]) -> str | None:
        if _stage(body) == "decode":
            return "1. Name three rivers in Europe."
        return codec(body)

    fake_llm.responder = repeating
    settings = settings_for(fake_llm, tmp_path, **BASE, budget=4, oversample=1.0, max_topups=3)
    summary = _generate(_seeds(tmp_path), tmp_path / "out", settings)
    assert summary.budget.model_dump() == {"wanted": 4, "published": 1, "shortfall": 3, "topup_passes": 1,
                                 "limit": "top-up 1 made no new basic instruction (all failed or repeats)"}
    assert summary.counts["rejected"] == {"duplicate": 1 + 2}  # first pass: 1 of 2; the top-up: both


@pytest.mark.slow  # ~15 s
def test_a_fixed_count_per_metadata_is_not_topped_up_but_the_shortfall_is_reported(
        prefect_harness: None, fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """`instructions_per_metadata` fixes how many basic instructions are made (the CPU demo relies on it): no
    top-up, and the manifest says why the run is short."""
    fake_llm.responder = Model(gap=8)
    settings = settings_for(fake_llm, tmp_path, **BASE, budget=5, instructions_per_metadata=1)
    summary = _generate(_seeds(tmp_path), tmp_path / "out", settings)
    assert summary.budget.model_dump() == {"wanted": 5, "published": 2, "shortfall": 3, "topup_passes": 0, "limit":
                                 "instructions_per_metadata = 1 fixes how many basic instructions are made, so none "
                                 "were topped up"}
