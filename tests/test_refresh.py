"""The `refresh` flow on the Prefect harness against the fake server: seed drops become versions, a rerun or
the same slot makes none, a killed refresh leaves the previous version and `latest` alone, CRR change."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import settings_for

from codeclm.ops.versions import RefreshBusy, VersionStore, content_sha
from codeclm.testing.fake_llm import FakeLLMServer

pytestmark = pytest.mark.usefixtures("prefect_harness")

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_metadata": 4, "instructions_per_metadata": 2, "n_rubrics": 2, "max_rounds": 1, "budget": 100,
         "batch_size": 10, "max_parallel_batches": 2}
DROP_1 = [("d1-poem", "Write a short poem about autumn rain on a tin roof."),
          ("d1-sql", "My SQL query with three joins is slow on a small table. How do I find out why?"),
          ("d1-moon", "Explain to a ten-year-old why the moon has phases.")]
DROP_2 = [("d2-bread", "Give me a simple recipe for sourdough bread for a beginner."),
          ("d2-email", "Draft a polite email asking my landlord to fix a leaking tap.")]
QUESTIONS = [{"question_id": f"q{i}", "prompt": p} for i, p in enumerate(
    ["Name three uses of a paperclip.", "Summarise why the sky is blue.", "Write a limerick about a cat."])]
TARGET = "openai/fake-target-{version}"


def _drop(drops: Path, name: str, seeds: list[tuple[str, str]]) -> None:
    drops.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(seeds, columns=["seed_id", "instruction"]).to_parquet(drops / name)


def _benchmark(tmp_path: Path) -> str:
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return str(path)


def _refresh(drops: Path, root: Path, settings: Any, bench: str, slot: str) -> dict[str, Any]:
    from flows.refresh import refresh

    return refresh(str(drops), str(root), settings, benchmarks=[bench], targets=[TARGET], eval_limit=3, slot=slot)


def _tree(path: Path) -> dict[str, str]:
    """Every file under a version with its sha256: a version must never change once published."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _seed_ids(version_dir: Path) -> set[str]:
    return set(pd.read_parquet(version_dir / "dataset" / "stages" / "seeds.parquet")["seed_id"])


def _latest_report() -> str:
    from prefect.artifacts import Artifact

    artifact = Artifact.get("refresh-report")
    assert artifact is not None
    return str(artifact.data)


@pytest.mark.slow  # ~50 s end to end: CI runs it in make test-slow
def test_seed_drops_make_versions_and_reruns_make_none(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    settings = settings_for(fake_llm, tmp_path, **SMALL)
    drops, root, bench = tmp_path / "drops", tmp_path / "root", _benchmark(tmp_path)
    store = VersionStore(root)

    _drop(drops, "drop-001.parquet", DROP_1)
    first = _refresh(drops, root, settings, bench, slot="2026-01-01T02:00Z")
    assert (first.status, first.version, first.previous, first.new_seeds) == ("published", "v0001",
                                                                                        None, 3)
    assert _seed_ids(root / "versions" / "v0001") == {s for s, _ in DROP_1}
    assert [d.delta_pp for d in first.crr_delta] == [None]  # nothing to compare with yet
    v1 = _tree(root / "versions" / "v0001")

    # the second drop repeats one seed of the first (another id, same text): only the two new ones are processed
    _drop(drops, "drop-002.parquet", [*DROP_2, ("d2-dup", DROP_1[0][1] + "  ")])
    second = _refresh(drops, root, settings, bench, slot="2026-01-02T02:00Z")
    assert (second.status, second.version, second.previous, second.new_seeds) == ("published", "v0002",
                                                                                           "v0001", 2)
    assert _seed_ids(root / "versions" / "v0002") == {s for s, _ in DROP_2}
    assert _tree(root / "versions" / "v0001") == v1
    assert store.latest() == "v0002" and [e["version"] for e in store.history()] == ["v0001", "v0002"]
    assert os.readlink(root / "latest") == "versions/v0002"
    assert (root / "latest" / "dataset" / "train.parquet").is_file()
    assert store.processed() == {content_sha(t) for _, t in DROP_1 + DROP_2}
    assert store.train_files() == [root / "versions" / v / "dataset" / "train.parquet" for v in ("v0001", "v0002")]

    # the CRR change is against v0001's number for the same benchmark and target spec (model name differs)
    (delta,) = second.crr_delta
    (old,) = first.eval
    assert (delta.target, old["target"]) == ("openai/fake-target-v0002", "openai/fake-target-v0001")
    assert delta.previous_version == "v0001" and delta.previous_crr == old["crr"]
    assert delta.delta_pp == pytest.approx(delta.crr - old["crr"])
    report = _latest_report()
    assert "Refresh v0002" in report and "2 new seeds" in report and f"{delta.delta_pp:+.2f}" in report
    version = json.loads((root / "versions" / "v0002" / "version.json").read_text())
    pairs = version["changes"]["pairs"]
    assert (pairs["added"], pairs["removed"], pairs["before"]) == (second.train, 0, first.train)
    assert "## What changed against v0001" in report and f"pairs: {second.train} added, 0 removed" in report
    assert version["crr_delta"] == [d.model_dump() for d in second.crr_delta]

    # the same drops again in a new slot: nothing new, no version
    calls = len(fake_llm.requests)
    third = _refresh(drops, root, settings, bench, slot="2026-01-03T02:00Z")
    assert (third.status, third.version) == ("no-new-seeds", "v0002")
    assert len(fake_llm.requests) == calls
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v0001", "v0002"]

    # the slot that made v0002 triggered again (scheduler + manual): one version per slot, even with new seeds
    _drop(drops, "drop-003.parquet", [("d3-tea", "How do I brew green tea without it turning bitter?")])
    again = _refresh(drops, root, settings, bench, slot="2026-01-02T02:00Z")
    assert (again.status, again.version) == ("slot-done", "v0002")
    assert [e["version"] for e in store.history()] == ["v0001", "v0002"]
    assert len(fake_llm.requests) == calls


_CHILD = """
import sys
from codeclm.settings import Settings
from flows.refresh import refresh
settings = Settings.model_validate_json(sys.argv[1])
refresh(sys.argv[2], sys.argv[3], settings, run_eval=False, slot=sys.argv[4])
"""


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.slow  # a drill (a minute): CI runs it in make test-slow
def test_killed_refresh_leaves_previous_version_and_latest(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    settings = settings_for(fake_llm, tmp_path, **SMALL)
    drops, root = tmp_path / "drops", tmp_path / "root"
    store = VersionStore(root)
    _drop(drops, "drop-001.parquet", DROP_1)
    from flows.refresh import refresh

    assert refresh(str(drops), str(root), settings, run_eval=False, slot="s1").version == "v0001"
    v1, registry, link = _tree(root / "versions" / "v0001"), store.registry_path.read_bytes(), os.readlink(
        root / "latest")

    _drop(drops, "drop-002.parquet", DROP_2)
    fake_llm.latency = 0.5  # slow enough that the child is surely mid-generation when it is killed
    before = len(fake_llm.requests)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, settings.model_dump_json(), str(drops), str(root), "s2"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        _wait_for(lambda: any(p.name.startswith(".v0002.partial") for p in (root / "versions").iterdir())
                  and len(fake_llm.requests) > before, 120, "the child refresh to start generating v0002")
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL

    assert store.registry_path.read_bytes() == registry
    assert os.readlink(root / "latest") == link == "versions/v0001"
    assert _tree(root / "versions" / "v0001") == v1
    assert not (root / "versions" / "v0002").exists()

    # the next refresh cleans up the leftover and makes v0002 from the same new seeds
    fake_llm.latency = 0.0
    result = refresh(str(drops), str(root), settings, run_eval=False, slot="s2")
    assert (result.version, result.new_seeds) == ("v0002", 2)
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v0001", "v0002"]
    assert _tree(root / "versions" / "v0001") == v1


def test_a_second_refresh_of_the_same_root_is_refused(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "root")
    with store.lock(), pytest.raises(RefreshBusy, match="another refresh is running"), store.lock():
        pass
    with store.lock():  # released again once the holder is done
        assert store.latest() is None


def test_an_unreachable_judge_stops_the_refresh_before_any_generation_call(fake_llm: FakeLLMServer,
                                                                           tmp_path: Path) -> None:
    from codeclm.errors import ModelError
    from codeclm.ops.processes import free_port

    settings = settings_for(fake_llm, tmp_path, **SMALL)
    settings.judge.api_base = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    _drop(tmp_path / "drops", "d1.parquet", DROP_1)
    with pytest.raises(ModelError, match="judge"):
        _refresh(tmp_path / "drops", tmp_path / "root", settings, _benchmark(tmp_path), "2026-11-30T02:00")
    assert fake_llm.requests == []  # the night's data was not paid for a version that could not be evaluated
    assert VersionStore(tmp_path / "root").latest() is None
