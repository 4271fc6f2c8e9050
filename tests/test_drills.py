"""Failure drills of issue #13 that concern what is kept on disk: a corrupted call-cache entry, a full disk
while publishing, and two refreshes started at once on one root. Each asserts that nothing is lost."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import settings_for
from pydantic import BaseModel

from codeclm.llm.gateway import Call
from codeclm.testing.fake_llm import FakeLLMServer
from tasks._base import Step


class Answer(BaseModel):
    answer: str


def _calls(n: int) -> list[Call]:
    return [Call(role="strong", messages=[{"role": "user", "content": f"question {i}"}], output=Answer,
                 prompt_version="drill", stage="drill", item_id=f"q{i}") for i in range(n)]


@pytest.mark.parametrize("damage", ["garbage bytes", "torn JSON", "JSON of another shape", "empty file"])
def test_a_corrupted_call_cache_entry_is_a_reported_miss(damage: str, fake_llm: FakeLLMServer, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(fake_llm, tmp_path)
    first = Step("drill", "b1", settings).call(_calls(3))
    assert all(r.ok and not r.cached for r in first) and len(fake_llm.requests) == 3
    entry = settings.cache_dir / first[1].key[:2] / f"{first[1].key}.json"
    entry.write_bytes({"garbage bytes": b"\x00\xff\xfe not json", "torn JSON": entry.read_bytes()[:20],
                       "JSON of another shape": b'["text"]', "empty file": b""}[damage])

    step = Step("drill", "b2", settings)
    with caplog.at_level(logging.WARNING, logger="codeclm.llm.cache"):
        again = step.call(_calls(3))
    assert [r.ok for r in again] == [True] * 3 and [r.cached for r in again] == [True, False, True]
    assert again[1].value == first[1].value  # the call was made again, same answer on the deterministic server
    assert len(fake_llm.requests) == 4  # one call repeated: the corrupt one, nothing else
    assert step.stats.cache_unreadable == 1 and step.stats.failed == 0
    lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(lines) == 1 and str(entry) in lines[0] and "treating it as a miss" in lines[0]
    assert Step("drill", "b3", settings).call(_calls(3))[1].cached  # the fresh answer replaced the entry


# --- disk full while publishing ------------------------------------------------------------------------------

# Runs inside a private mount namespace (`unshare -m`, or `unshare -rm` without root): mounts a small tmpfs,
# publishes a dataset there, fills the disk, runs again with another threshold (every call cached, so the
# second run only has to publish), and prints what it saw as JSON. argv: disk, seeds, config.
DISK_FULL_DRIVER = r"""
import hashlib, json, os, subprocess, sys
from pathlib import Path
disk, seeds, config = map(Path, sys.argv[1:4])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
out = disk / "out"
codeclm = str(Path(sys.executable).with_name("codeclm"))
run = lambda *extra: subprocess.run([codeclm, "generate", str(seeds), "--out", str(out), "--config", str(config),
                                     *extra], capture_output=True, text=True, timeout=600)
files = lambda: {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(out.rglob("*")) if p.is_file()}
first = run()
before = files() if first.returncode == 0 else {}
# fill the disk, then give back a few blocks: room to start, not to finish (unbuffered: nothing is left to flush
# at close, where a buffered file would raise ENOSPC again)
with open(disk / "filler", "wb", buffering=0) as fh:
    try:
        while True:
            fh.write(b"\0" * 65536)
    except OSError:
        pass
    fh.truncate(max(0, fh.tell() - 5 * 4096))
second = run("--threshold", "2.5")
from codeclm.publish import leftovers
print(json.dumps({"first": [first.returncode, first.stderr[-2000:]], "second": [second.returncode, second.stderr],
                  "before": before, "after": files(), "leftovers": leftovers(out)}))
"""


def _namespace_prefix() -> list[str] | None:
    """How to get a private mount namespace here: as root `unshare -m`; otherwise a user namespace."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/mnt"],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


@pytest.mark.slow
def test_disk_full_while_publishing_is_one_clear_line_and_keeps_the_previous_output(fake_llm: FakeLLMServer,
                                                                                    tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare -m / -rm refused), so no small tmpfs to fill")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"seed_id": f"s{i}", "instruction": text}) + "\n" for i, text in enumerate(
        ["Write a short poem about autumn rain.", "Explain why the moon has phases.", "How do I speed up SQL?"])))
    config = tmp_path / "codeclm.toml"
    config.write_text('n_metadata = 4\ninstructions_per_metadata = 2\nn_rubrics = 2\nmax_rounds = 2\nbudget = 100\n'
                      + "".join(f'[{role}]\nmodel = "openai/fake-{role}"\napi_base = "{fake_llm.url}"\n'
                                f'output_mode = "json_schema"\n' for role in ("strong", "target", "judge")))
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    repo = str(Path(__file__).resolve().parents[1])
    env |= {"CODECLM_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect" / "storage"),
            "PYTHONPATH": repo, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    done = subprocess.run([*prefix, sys.executable, "-c", DISK_FULL_DRIVER, str(disk), str(seeds), str(config)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["first"][0] == 0, seen["first"][1]
    code, stderr = seen["second"]
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    # the run's own log shows the failed task; the CLI ends with one line that says what and what to do
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], stderr[-3000:]
    assert "disk full" in lines[-1] and "the previous output is intact" in lines[-1] and "Traceback" not in stderr
    assert seen["after"] == seen["before"] and "manifest.json" in seen["before"]  # the old dataset, byte for byte
    assert seen["leftovers"] == []  # the half-written version was removed


# --- two refreshes at once on one root -----------------------------------------------------------------------

def _cli_env(tmp_path: Path, name: str) -> dict[str, str]:
    """A CLI child's environment: its own Prefect home (each starts its own temporary API), one shared codeclm home."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    return env | {"CODECLM_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / name),
                  "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / name / "storage"),
                  "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


@pytest.mark.slow
def test_two_refreshes_at_once_on_one_root_one_is_refused_and_nothing_is_corrupted(fake_llm: FakeLLMServer,
                                                                                    tmp_path: Path) -> None:
    """Refresh A holds the root (its LLM calls are held at the server) when refresh B starts on the same root
    and slot: B stops with one line and exit 2, touching nothing; A then publishes v0001 whole."""
    import json
    import os
    import subprocess
    import sys
    import threading
    import time

    import pandas as pd

    from codeclm.ops.versions import VersionStore
    from codeclm.publish import leftovers

    gate = threading.Event()

    def hold(body: dict[str, object]) -> None:
        gate.wait(300)  # every call of A waits here until B was refused; then the default answer
        return None

    fake_llm.responder = hold
    drops, root = tmp_path / "drops", tmp_path / "root"
    drops.mkdir()
    pd.DataFrame([("d-poem", "Write a short poem about autumn rain."), ("d-moon", "Why does the moon have phases?")],
                 columns=["seed_id", "instruction"]).to_parquet(drops / "drop-001.parquet")
    config = tmp_path / "codeclm.toml"
    config.write_text('n_metadata = 2\ninstructions_per_metadata = 2\nn_rubrics = 2\nmax_rounds = 1\nbudget = 100\n'
                      + "".join(f'[{role}]\nmodel = "openai/fake-{role}"\napi_base = "{fake_llm.url}"\n'
                                f'output_mode = "json_schema"\n' for role in ("strong", "target", "judge")))
    codeclm = str(Path(sys.executable).with_name("codeclm"))
    args = ["refresh", str(drops), "--root", str(root), "--config", str(config), "--no-evaluate",
            "--slot", "2026-01-01T02:00Z"]

    def start(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen([codeclm, *args], env=_cli_env(tmp_path, name), cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    a = start("prefect-a")
    try:
        deadline = time.monotonic() + 240
        while not any(p.name.startswith(".v0001.partial") for p in (root / "versions").glob(".*")):  # A locked
            assert a.poll() is None and time.monotonic() < deadline, "refresh A never got going"
            time.sleep(0.2)
        b = start("prefect-b")
        _, b_err = b.communicate(timeout=240)
    finally:
        gate.set()
    a_out, a_err = a.communicate(timeout=300)

    b_lines = b_err.strip().splitlines()
    assert b.returncode == 2, b_err[-3000:]
    assert [line for line in b_lines if line.startswith("error: ")] == b_lines[-1:], b_err[-3000:]
    assert "another refresh is running on this root" in b_lines[-1] and "Traceback" not in b_err
    assert a.returncode == 0, a_err[-3000:]
    assert "v0001: 2 new seeds" in a_out
    store = VersionStore(root)
    assert [e["version"] for e in store.history()] == ["v0001"] and store.latest() == "v0001"
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v0001"]  # no partial, no second version
    assert os.readlink(root / "latest") == "versions/v0001"
    dataset = root / "latest" / "dataset"
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["counts"]["seeds"] == 2 and leftovers(dataset) == []
    assert json.loads((root / "versions" / "v0001" / "version.json").read_text())["version"] == "v0001"
