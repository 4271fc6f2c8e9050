"""Failure drills on the loopback server (slow): the fault mix and an endpoint down for 30 s mid-run.

Each drill runs `generate` in this process on real Prefect against FakeLLMServer and asserts the promise of
docs/reliability.md "Faults": the run finishes with its manifest and nothing is lost (every basic instruction
ends once, as kept, rejected or failed: the export checks that lineage and the drill checks the counts).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import settings_for

from codeclm.llm.breaker import breaker_for
from codeclm.settings import Settings
from codeclm.testing.fake_llm import FakeLLMServer, codeclm_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900, method="thread")]

LATENCY = 0.05  # seconds per answer
SLOTS = 32  # answers the server works on at once
SEEDS = 16
BUDGET = 300
# the mix, as shares of all requests (rules are tried in order, so each rate is of what is left)
MIX = [("hang", None, 0.01), ("http", 429, 0.10), ("http", 500, 0.05), ("invalid_json", None, 0.05),
       ("truncate", None, 0.02)]


def fault_rules() -> list[dict[str, Any]]:
    rules, left = [], 1.0
    for kind, status, share in MIX:
        rule: dict[str, Any] = {"kind": kind, "rate": share / left}
        if status is not None:
            rule["status"] = status
        rules.append(rule)
        left -= share
    return rules


def _seeds(tmp_path: Path, count: int) -> Path:
    topics = ["tea", "rivers", "git", "taxes", "chess", "bread", "orbits", "poems"]
    rows = [(f"d{i}", f"Explain {topics[i % len(topics)]} to a newcomer, in the style of example {i}.")
            for i in range(count)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "seeds.jsonl"
    pd.DataFrame(rows, columns=["seed_id", "instruction"]).to_json(path, orient="records", lines=True)
    return path


def _run(server: FakeLLMServer, tmp_path: Path, seeds: int = SEEDS, budget: int = BUDGET,
         **overrides: Any) -> tuple[float, dict[str, Any]]:
    """Generate into tmp_path/out with default settings (models on the server, budget BUDGET); returns the
    seconds it took and the published manifest, after checking that nothing was lost."""
    from flows.generate import generate

    defaults = {name: Settings.model_fields[name].default for name in ("backoff_base", "backoff_max")}
    settings = settings_for(server, tmp_path, budget=budget, timeout=120.0, **defaults | overrides)
    out = tmp_path / "out"
    started = time.monotonic()
    generate(str(_seeds(tmp_path, seeds)), str(out), settings)
    seconds = time.monotonic() - started
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    train = pd.read_parquet(out / "train.parquet")
    rejected = pd.read_parquet(out / "rejected.parquet")
    failed = pd.read_parquet(out / "failed_calls.parquet")
    failed_ids = set(failed["instruction_id"].dropna()) - {""}
    ends = list(train["instruction_id"]) + list(rejected["instruction_id"]) + sorted(failed_ids)
    assert len(ends) == len(set(ends)) == counts["basic_instructions"] > 0  # each ends once, none vanished
    return seconds, manifest


def test_fault_mix_finishes_in_under_twice_the_clean_time(prefect_harness: None, tmp_path: Path) -> None:
    with FakeLLMServer(latency=LATENCY, slots=SLOTS, seed=13) as clean:
        clean_s, clean_manifest = _run(clean, tmp_path / "clean")
    with FakeLLMServer(latency=LATENCY, slots=SLOTS, seed=13) as faulty:
        faulty.set_faults(fault_rules())
        faulty_s, manifest = _run(faulty, tmp_path / "faults")
    faults = pd.Series([r["fault"] for r in faulty.requests]).value_counts().to_dict()  # hung ones end at stop
    print(f"\nfault mix: clean {clean_s:.1f}s ({clean_manifest['totals']['calls']} calls), "
          f"faults {faulty_s:.1f}s ({manifest['totals']['calls']} calls, {faults}), "
          f"failed calls {manifest['totals']['failed']}, ratio {faulty_s / clean_s:.2f}")
    assert faults.get("hang", 0) > 0 and faults.get("http", 0) > 0  # the mix really was served
    assert faulty_s < 2 * clean_s


# issue 21's weather: plain-text mode (model names litellm does not know), 30 ms answers, chatty answers too
WEATHER = [("hang", None, 0.01), ("http", 429, 0.10), ("http", 500, 0.05), ("chatty", None, 0.05),
           ("truncate", None, 0.02)]


def test_bad_weather_in_plain_text_mode_finishes_in_under_twice_the_clean_time(prefect_harness: None,
                                                                                 tmp_path: Path) -> None:
    """The mix of bench/weather.py (its figures are in docs/benchmarks.md): output mode `auto` picks plain
    text for models litellm does not know, so chatty and cut answers are parse retries."""
    rules, left = [], 1.0
    for kind, status, share in WEATHER:
        rules.append({"kind": kind, "rate": share / left, **({"status": status} if status else {}),
                      **({"seconds": 300} if kind == "hang" else {})})
        left -= share
    with FakeLLMServer(latency=0.03, slots=SLOTS, seed=21, responder=codeclm_text) as clean:
        clean_s, clean_manifest = _run(clean, tmp_path / "clean", output_mode="auto")
    with FakeLLMServer(latency=0.03, slots=SLOTS, seed=21, responder=codeclm_text) as faulty:
        faulty.set_faults(rules)
        faulty_s, manifest = _run(faulty, tmp_path / "faults", output_mode="auto")
    faults = pd.Series([r["fault"] for r in faulty.requests]).value_counts().to_dict()
    print(f"\nweather: clean {clean_s:.1f}s ({clean_manifest['totals']['calls']} calls), faults {faulty_s:.1f}s "
          f"({manifest['totals']['calls']} calls, {faults}), failed calls {manifest['totals']['failed']}, "
          f"ratio {faulty_s / clean_s:.2f}")
    assert faults.get("chatty", 0) > 0 and faults.get("http", 0) > 0  # the mix really was served
    assert clean_manifest["counts"]["train"] > 0  # plain text really was parsed
    assert faulty_s < 2 * clean_s


def test_endpoint_down_for_30s_mid_run_pauses_then_resumes(prefect_harness: None, tmp_path: Path) -> None:
    with FakeLLMServer(latency=LATENCY, slots=SLOTS, seed=5) as server:
        def take_down() -> None:
            while len(server.requests) < 200:
                time.sleep(0.05)
            server.outage(30.0)

        threading.Thread(target=take_down, daemon=True).start()
        seconds, manifest = _run(server, tmp_path, seeds=4, budget=50)  # small: the outage is the point
        url = server.url
    print(f"\noutage drill: {seconds:.1f}s, {manifest['totals']['calls']} calls, "
          f"failed calls {manifest['totals']['failed']}")
    opened = sum(breaker_for(f"openai/fake-{role}@{url}").openings for role in ("strong", "target"))
    assert opened >= 1 and seconds >= 30  # the breaker opened, and the run waited the outage out
    assert manifest["totals"]["failed"] == 0  # paused, not failed: no attempt was spent on a dead endpoint
