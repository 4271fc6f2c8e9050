"""What a refresh version changed against the one before (codeclm.ops.versions.version_changes), and
`codeclm show` over a dataset, a version and a refresh root: 80 columns, lineage, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from test_profile import _pair, make_dataset
from typer.testing import CliRunner

from codeclm.cli import app
from codeclm.ops.versions import VersionStore, report_markdown, version_changes
from codeclm.profile import write_profile


def _dataset(folder: Path, use_cases: tuple[str, str], pairs: list | None = None) -> None:
    manifest = make_dataset(folder, use_cases, pairs)
    manifest["files"] = write_profile(folder, manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _store(tmp_path: Path) -> VersionStore:
    """A root with v0001 registered (3 pairs: cooking x2, sql tuning x1) and v0002 staged, not yet registered."""
    root = tmp_path / "root"
    _dataset(root / "versions" / "v0001" / "dataset", ("cooking", "sql tuning"))
    entry = {"version": "v0001", "slot": "s1", "train": 3, "seeds_new": 1, "seed_files": ["a.parquet"],
             "parent": None, "created_at": "now", "crr_delta": []}
    (root / "versions" / "v0001" / "version.json").write_text(json.dumps(entry))
    (root / "registry.json").write_text(json.dumps({"latest": "v0001", "history": [entry]}))
    new_pairs = [_pair(1, "cooking", ["baking"], 4.0),  # the very pair v0001 has: not added again
                 _pair(5, "poetry", ["rhyme"], 6.0, rnd=2), _pair(6, "poetry", ["metre"], -5.0, rnd=3)]
    new_pairs[1].instruction = "i" * 10  # the instruction text of v0001's p-1: a repeat under another id
    _dataset(root / "versions" / ".v0002.partial" / "dataset", ("cooking", "poetry"), new_pairs)
    return VersionStore(root)


def test_version_changes_name_use_cases_skills_shifts_and_pairs(tmp_path: Path) -> None:
    store = _store(tmp_path)
    changes = version_changes(store, "v0001", store.versions / ".v0002.partial" / "dataset")
    assert changes is not None
    assert changes["use_cases"] == {"new": ["poetry"], "gone": ["sql tuning"]}
    assert changes["skills"] == {"new": ["metre", "rhyme"], "gone": ["indexes", "timing"]}
    assert changes["pairs"] == {"before": 3, "added": 2, "removed": 0, "after": 5, "repeats": 2}
    shifts = {s["what"]: s for s in changes["shifts"]}
    assert shifts["round of kept pairs (mean)"] == {"what": "round of kept pairs (mean)", "before": 2.0,
                                                    "after": 2.0, "change": 0.0}
    assert shifts["response length (median chars)"]["change"] == 300.0  # 200 -> 500
    report = report_markdown({"version": "v0002", "slot": "s2", "parent": "v0001", "seeds_new": 1,
                              "seed_files": ["b.parquet"], "train": 3, "totals": {}, "crr_delta": [],
                              "changes": changes})
    assert "## What changed against v0001" in report
    assert "* use cases: 1 new (poetry), 1 gone (sql tuning) against the previous version's pairs" in report
    assert "* pairs: 2 added, 0 removed from the full dataset (3 → 5); 2 of the new pairs repeat" in report
    assert "* response length (median chars): 200 → 500 (+300)" in report
    assert version_changes(store, None, store.versions / ".v0002.partial" / "dataset") is None


def test_lost_pairs_of_an_earlier_version_are_reported_as_removed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    (store.path("v0001") / "dataset" / "train.parquet").unlink()
    shutil.copy(store.versions / ".v0002.partial" / "dataset" / "profile.json",
                store.path("v0001") / "dataset" / "profile.json")
    changes = version_changes(store, "v0001", store.versions / ".v0002.partial" / "dataset")
    assert changes is not None and changes["pairs"]["removed"] == 3 and changes["pairs"]["added"] == 3


def _show(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["show", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_show_prints_the_profile_and_samples_with_lineage_in_80_columns(tmp_path: Path) -> None:
    store = _store(tmp_path)
    code, out = _show(str(store.path("v0001") / "dataset"), "--samples", "2")
    assert code == 0, out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "3 (codeclm) from 1 seeds" in out and "1 never reached" in out
    assert out.count("basic instruction:") == 2 and "seed s-1: Bake a lemon cake." in out
    assert "p-1 · cooking" in out and "p-3 · sql tuning" in out  # round-robin: every use case before a second
    assert "p-2 ·" not in out and "actions: add a constraint → add a constraint" in out  # p-3's two actions


def test_show_resolves_a_refresh_root_to_its_latest_version_with_its_changes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    partial = store.versions / ".v0002.partial"
    entry = {"version": "v0002", "slot": "s2", "train": 3, "seeds_new": 1, "seed_files": ["b.parquet"],
             "parent": "v0001", "created_at": "now", "crr_delta": [],
             "changes": version_changes(store, "v0001", partial / "dataset")}
    store.commit(partial, entry)
    code, out = _show(str(store.root), "-n", "3")
    assert code == 0, out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "v0002" in out and "changes against the previous version" in out and "poetry" in out
    assert "actions: add a constraint → add a constraint" in out


def test_show_of_a_folder_that_is_no_dataset_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, out = _show(str(tmp_path))
    assert code == 2 and "not a dataset, a refresh version or a refresh root" in out
