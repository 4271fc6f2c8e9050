"""The dataset profile (codeclm.profile) over small hand-made tables: every number a reader relies on, the
charts (theta marked), samples with their lineage, and the files written beside a dataset."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from codeclm.profile import CHARTS, artifact_markdown, charts, dataset_profile, load_profile, write_profile
from codeclm.records import FailedCall, FilterDecision, Metadata, RejectedCandidate, Seed, TrainingPair
from codeclm.storage import file_sha256, write_records

THETA = 3.0


def _pair(i: int, use_case: str, skills: list[str], gap: float, source: str = "strong", rnd: int = 1,
          meta: str = "m-1") -> TrainingPair:
    return TrainingPair(
        pair_id=f"p-{i}", instruction="i" * (10 * i), response="r" * (100 * i), response_source=source,  # type: ignore[arg-type]
        other_response="o", instruction_id=f"in-{i}", candidate_id=f"c-{i}", seed_ids=["s-1"], metadata_id=meta,
        use_case=use_case, skills=skills, basic_instruction=f"basic {i}",
        actions_applied=["add a constraint"] * (rnd - 1),
        round=rnd, strong_model="s", target_model="t", strong_score_first=8, strong_score_second=8,
        target_score_first=4, target_score_second=4, gap=gap, decision="keep_strong")


def make_dataset(folder: Path, use_cases: tuple[str, str] = ("cooking", "sql tuning"),
                 pairs: list[TrainingPair] | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    write_records(folder / "stages" / "seeds.parquet", [Seed(seed_id="s-1", instruction="Bake a lemon cake.")], Seed)
    write_records(folder / "stages" / "metadata.parquet", [
        Metadata(metadata_id="m-1", use_case=use_cases[0], skills=["baking", "timing"], origin="seed",
                 seed_ids=["s-1"]),
        Metadata(metadata_id="m-2", use_case=use_cases[1], skills=["indexes", "never used"], origin="seed",
                 seed_ids=["s-1"]),
        Metadata(metadata_id="m-3", use_case=use_cases[1], skills=["indexes"], origin="augmented", seed_ids=["s-1"]),
    ], Metadata)
    pairs = pairs if pairs is not None else [
        _pair(1, use_cases[0], ["baking"], 4.0), _pair(2, use_cases[0], ["timing"], 5.0, rnd=2),
        _pair(3, use_cases[1], ["indexes"], -4.0, source="target", rnd=3, meta="m-2")]
    write_records(folder / "train.parquet", pairs, TrainingPair)
    write_records(folder / "rejected.parquet", [
        RejectedCandidate(instruction_id="in-9", candidate_id="c-9", metadata_id="m-1", round=1, instruction="x",
                          reason="duplicate"),
        RejectedCandidate(instruction_id="in-8", candidate_id="c-8", metadata_id="m-1", round=2, instruction="y",
                          reason="below_threshold", gap=1.0)], RejectedCandidate)
    write_records(folder / "failed_calls.parquet", [
        FailedCall(stage="score", item_id="c-7", role="judge", model="j", error_type="Timeout", message="m",
                   attempts=3, call_key="k")], FailedCall)
    decisions = [FilterDecision(candidate_id=f"c-{i}", instruction_id=f"in-{i}", round=r, gap=g, decision=d)
                 for i, r, g, d in [(1, 1, 4.0, "keep_strong"), (2, 1, 0.0, "next_round"), (2, 2, 5.0, "keep_strong"),
                                    (3, 1, 1.0, "next_round"), (3, 2, 2.0, "next_round"), (3, 3, -4.0, "keep_target"),
                                    (8, 1, 0.5, "next_round"), (8, 2, 1.0, "reject")]]
    write_records(folder / "stages" / "decisions.parquet", decisions, FilterDecision)
    return {"method": "codeclm", "settings": {"threshold": THETA},
            "stages": [{"stage": "decode", "calls": 6, "prompt_tokens": 100, "completion_tokens": 50, "cost_usd": 0.03},
                       {"stage": "score", "calls": 12, "prompt_tokens": 1200, "completion_tokens": 0,
                        "cost_usd": 0.06}],
            "totals": {"unpriced_calls": 0}}


def test_profile_counts_what_the_tables_hold(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path)
    p = dataset_profile(tmp_path, manifest)
    assert (p["pairs"], p["seeds"], p["metadata"]) == (3, 1, {"seed": 2, "augmented": 1})
    assert p["use_cases"] == [
        {"use_case": "cooking", "seed_metadata": 1, "metadata": 1, "pairs": 2},
        {"use_case": "sql tuning", "seed_metadata": 1, "metadata": 2, "pairs": 1}]
    assert p["skills"]["unreached"] == ["never used"]
    assert (p["skills"]["in_seeds"], p["skills"]["in_data"]) == (4, 3)
    assert p["lengths"]["instruction"]["median"] == 20 and p["lengths"]["response"]["max"] == 300
    assert p["rounds"] == {"kept": {"1": 1, "2": 1, "3": 1}, "reached": {"1": 1, "2": 2, "3": 1}}
    assert p["theta"] == THETA and p["gap"]["n"] == 8 and p["gap"]["min"] == -4.0
    assert sum(p["gap"]["histogram"]) == 8
    assert p["answered_by"] == {"strong": 2, "target": 1}
    assert p["rejected"] == {"duplicate": 1, "below_threshold": 1} and p["duplicates_dropped"] == 1
    assert p["failed_calls"] == {"score": 1}
    total = p["cost"]["total"]
    assert (total["calls"], total["tokens"], total["calls_per_pair"], total["cost_per_pair"]) == (18, 1350, 6.0, 0.03)
    assert [s["stage"] for s in p["cost"]["stages"]] == ["decode", "score"]


def test_samples_carry_their_lineage(tmp_path: Path) -> None:
    p = dataset_profile(tmp_path, make_dataset(tmp_path))
    by_id = {s["pair_id"]: s for s in p["samples"]}
    assert set(by_id) == {"p-1", "p-2", "p-3"}
    s = by_id["p-3"]
    assert s["seeds"] == [{"seed_id": "s-1", "instruction": "Bake a lemon cake."}]
    assert s["metadata"] == {"metadata_id": "m-2", "origin": "seed", "skills": ["indexes"]}
    assert (s["basic_instruction"], s["actions"], s["round"], s["answered_by"], s["gap"]) == (
        "basic 3", ["add a constraint"] * 2, 3, "target", -4.0)


def test_gap_chart_marks_theta_on_both_sides(tmp_path: Path) -> None:
    svgs = charts(dataset_profile(tmp_path, make_dataset(tmp_path)))
    assert set(svgs) == set(CHARTS)
    marks = re.findall(r"<title>θ = ([-\d.]+)</title>", svgs["gaps"])
    assert marks == ["-3", "3"]
    assert "no data" not in svgs["lengths"]
    assert "cooking" in svgs["use_cases"] and "sql tuning" in svgs["use_cases"]


def test_a_baseline_without_metadata_or_judgements_has_no_theta(tmp_path: Path) -> None:
    folder = tmp_path / "baseline"
    make_dataset(folder, pairs=[_pair(1, "", [], float("nan"), meta="")])
    for name in ("stages/metadata.parquet", "stages/decisions.parquet"):
        (folder / name).unlink()
    p = dataset_profile(folder, {"method": "self_instruct", "settings": {"threshold": THETA}, "stages": []})
    assert p["theta"] is None and p["gap"] == {"n": 0} and p["skills"]["known"] is False
    assert p["samples"][0]["metadata"] is None and p["samples"][0]["gap"] is None
    assert "θ" not in charts(p)["gaps"]


def test_write_profile_writes_files_the_manifest_hashes_and_the_artifact_inlines_charts(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path)
    files = write_profile(tmp_path, manifest)
    assert set(files) == {"profile.json", "profile.md", *CHARTS.values()}
    assert all(file_sha256(tmp_path / name) == sha for name, sha in files.items())
    assert load_profile(tmp_path) == json.loads((tmp_path / "profile.json").read_text())
    on_disk = (tmp_path / "profile.md").read_text()
    assert "](profile-gaps.svg)" in on_disk and "**1 seed skills the data never reached**: never used" in on_disk
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    md = artifact_markdown(tmp_path, "test")
    uris = re.findall(r"\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", md)
    assert len(uris) == 3 and all(base64.b64decode(u).startswith(b"<svg") for u in uris)
    assert "### cooking · `p-1`" in md and "* **basic instruction**: basic 2" in md
