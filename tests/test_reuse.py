"""`published_run`: a finished dataset is taken as it is only when it is this very run (same seeds by content,
settings, recipe and method, no failed call, every file as hashed); anything else makes the run again. The end to
end case (a rerun makes no call and keeps the published version) is in test_generate_flow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from codeclm.checks import SeedCheck, published_run, recipe_digest
from codeclm.settings import Settings
from codeclm.storage import file_sha256

SEEDS = SeedCheck(path="seeds.jsonl", sha="a" * 64, count=3)


def _publish(out: Path, settings: Settings, **changes: Any) -> Path:
    """A dataset folder as export writes it: files, and a manifest hashing them."""
    out.mkdir()
    (out / "train.jsonl").write_text('{"messages": []}\n')
    files = {"train.jsonl": file_sha256(out / "train.jsonl")}
    manifest = {"method": "codeclm", "recipe": recipe_digest(), "run": {"seeds_sha": SEEDS.sha},
                "settings": settings.for_stage("export").dump(), "files": files,
                "budget": {"wanted": 1, "published": 1, "shortfall": 0, "limit": None},
                "counts": {"train": 1}, "stages": [], "concurrency": [], "totals": {"calls": 9, "failed": 0}} | changes
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_the_same_run_is_reused_with_what_it_published(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    found = published_run(SEEDS, _publish(tmp_path / "out", settings), settings)
    assert found is not None and found.reused and found.train == 1 and found.totals["calls"] == 9


@pytest.mark.parametrize("change", ["seeds", "setting", "method", "recipe", "failed call", "file", "no manifest"])
def test_anything_different_runs_again(tmp_path: Path, change: str) -> None:
    settings = Settings(home=tmp_path / "home")
    manifest = {"recipe": "0" * 64} if change == "recipe" else {}
    if change == "failed call":
        manifest = {"totals": {"calls": 9, "failed": 1}}
    out = _publish(tmp_path / "out", settings, **manifest)
    seeds, method = SEEDS, "codeclm"
    if change == "seeds":
        seeds = SeedCheck(path=SEEDS.path, sha="b" * 64, count=3)
    elif change == "setting":
        settings = settings.model_copy(update={"threshold": settings.threshold + 1})
    elif change == "method":
        method = "metadata_only"
    elif change == "file":
        (out / "train.jsonl").write_text("")
    elif change == "no manifest":
        (out / "manifest.json").unlink()
    assert published_run(seeds, out, settings, method) is None


@pytest.mark.parametrize("failure", ["kept", "retry_failed", "not kept", "no key"])
def test_a_run_whose_only_failures_are_kept_is_reused_unless_asked_to_retry(tmp_path: Path, failure: str) -> None:
    """A failed call kept in the call cache (the same unusable answer twice at temperature 0) would be reported,
    not asked, by a rerun: the run is this very run. Any other failure, or --retry-failed, runs again."""
    from codeclm.llm.cache import CallCache
    from codeclm.records import FailedCall
    from codeclm.storage import write_records

    settings = Settings(home=tmp_path / "home", retry_failed=failure == "retry_failed")
    out = _publish(tmp_path / "out", settings, totals={"calls": 9, "failed": 1})
    key = "" if failure == "no key" else "k" * 64
    write_records(out / "failed_calls.parquet", [FailedCall(stage="judge", item_id="q7#strong_first", role="judge",
                                                           model="m", error_type="ParseError", message="x", attempts=2,
                                                           call_key=key)], FailedCall)
    if failure != "not kept" and key:
        CallCache(settings.cache_dir).put(key, {"failed": True, "text": "0.2 0.3", "error_type": "ParseError"})
    found = published_run(SEEDS, out, settings)
    assert (found is not None) == (failure == "kept")
