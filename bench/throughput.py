"""Throughput of the `generate` flow against a plain asyncio litellm loop making the same calls, side by side.

Both talk to one loopback FakeLLMServer with fixed latency and N parallel slots. The flow runs first while the
server records every request body; the plain loop then replays exactly those requests, stage by stage (each
stage needs the previous one's answers, so a hand-written client would wait at the same points), with the same
concurrency. Also measured: a rerun of the finished run (wall time, requests: target 0) and Prefect task runs
per 1,000 seeds (target <= 100). Prints a Markdown table; `--json` writes the figures too.

    .venv/bin/python bench/throughput.py [--seeds 1000] [--latency 0.2] [--slots 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path(tempfile.mkdtemp(prefix="codeclm-bench-"))
os.environ.update({"PREFECT_HOME": str(WORK / "prefect"), "CODECLM_HOME": str(WORK / "home"),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                   "PREFECT_LOGGING_LEVEL": "WARNING",
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"})

import pandas as pd  # noqa: E402

from codeclm.fake_llm import FakeLLMServer  # noqa: E402
from codeclm.settings import Settings  # noqa: E402

TOPICS = ["recursion", "photosynthesis", "inflation", "haiku", "SQL joins", "first aid", "budgeting", "gravity",
          "negotiation", "sourdough", "version control", "volcanoes", "compound interest", "sonnets", "HTTP caching",
          "sleep hygiene", "prime numbers", "public speaking", "composting", "unit testing"]
ASKS = ["Explain {t} to a beginner.", "Write a short poem about {t}.", "List common mistakes people make with {t}.",
        "Give a step-by-step guide to {t}.", "Compare two approaches to {t}."]


def seeds(n: int, path: Path) -> Path:
    """n distinct seed instructions written for this benchmark."""
    rows = [{"seed_id": f"b{i:05d}", "instruction": f"{ASKS[i % len(ASKS)].format(t=TOPICS[i % len(TOPICS)])} "
             f"(variant {i})"} for i in range(n)]
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def settings_for(url: str, slots: int, n_seeds: int) -> Settings:
    s = Settings.load(None, strong="openai/bench-strong", target="openai/bench-target", batch_size=max(1, n_seeds // 5),
                      n_metadata=min(200, n_seeds), budget=n_seeds // 2, max_parallel_batches=5)
    for role in (s.strong, s.target, s.judge):
        role.api_base, role.output_mode, role.max_concurrency = url, "json_schema", slots
    return s


def task_runs(flow_run_ids: list[str]) -> int:
    """Task runs recorded by Prefect for the given flow runs (the generate flow and its pipeline subflow)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=flow_run_ids)))
        ids = flow_run_ids + [str(c.id) for c in children]
        count, page = 0, 200
        while batch := client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                                             limit=page, offset=count):
            count += len(batch)
            if len(batch) < page:
                break
    return count


async def replay(bodies: list[dict[str, Any]], url: str, slots: int) -> float:
    """Plain asyncio + litellm, no Prefect, no cache: the same requests, stage by stage, `slots` at a time."""
    import litellm

    by_wave: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for body in bodies:
        by_wave[body["_wave"]].append(body)
    gate = asyncio.Semaphore(slots)

    async def one(body: dict[str, Any]) -> None:
        kwargs = {k: v for k, v in body.items() if k in ("messages", "temperature", "max_tokens", "response_format")}
        async with gate:
            await litellm.acompletion(model=f"openai/{body['model']}", api_base=url, api_key="sk-bench", timeout=60,
                                      max_retries=0, **kwargs)

    start = time.perf_counter()
    for wave in sorted(by_wave):
        await asyncio.gather(*(one(b) for b in by_wave[wave]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from flows.generate import generate

    captured: list[dict[str, Any]] = []

    def record(body: dict[str, Any]) -> None:
        """Keep each request with its wave: the flow's stage barriers show as changes of request kind."""
        prompt = " ".join(m.get("content", "") for m in body["messages"])
        kind = next((k for marker, k in STAGE_MARKERS if marker in prompt), "respond")
        wave = captured[-1]["_wave"] if captured else 0
        if captured and captured[-1]["_kind"] != kind:
            wave += 1
        captured.append({**body, "_kind": kind, "_wave": wave})

    seed_file = seeds(args.seeds, WORK / "seeds.parquet")
    with FakeLLMServer(latency=args.latency, slots=args.slots, responder=lambda b: record(b)) as server:
        settings = settings_for(server.url, args.slots, args.seeds)
        start = time.perf_counter()
        summary = generate(str(seed_file), str(WORK / "out"), settings)
        flow_seconds = time.perf_counter() - start
        flow_calls = len(server.requests)
        run_id = json.loads((WORK / "out" / "manifest.json").read_text())["run"]["flow_run_id"]

        server.reset()
        start = time.perf_counter()
        generate(str(seed_file), str(WORK / "out"), settings)
        rerun_seconds, rerun_requests = time.perf_counter() - start, len(server.requests)

        server.reset()
        plain_seconds = asyncio.run(replay(captured, server.url, args.slots))
        plain_calls = len(server.requests)

    runs = task_runs([run_id]) if run_id else -1
    figures = {
        "seeds": args.seeds, "latency_s": args.latency, "slots": args.slots,
        "flow_calls": flow_calls, "flow_seconds": round(flow_seconds, 2),
        "flow_calls_per_s": round(flow_calls / flow_seconds, 1),
        "plain_calls": plain_calls, "plain_seconds": round(plain_seconds, 2),
        "plain_calls_per_s": round(plain_calls / plain_seconds, 1),
        "ratio": round((flow_calls / flow_seconds) / (plain_calls / plain_seconds), 3),
        "rerun_seconds": round(rerun_seconds, 2), "rerun_requests": rerun_requests,
        "task_runs": runs, "task_runs_per_1000_seeds": round(runs * 1000 / args.seeds, 1),
        "train_pairs": summary["train"],
    }
    print("| figure | value |\n|---|---|")
    for key, value in figures.items():
        print(f"| {key} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


# (prompt marker, kind); decode and rubrics run concurrently in the flow, so they share one kind (one wave).
STAGE_MARKERS = [("Identify the use case", "encode"), ("Write only the instructions", "decode+rubrics"),
                 ("domain-specific rubrics", "decode+rubrics"), ("Improving action", "improve"),
                 ("feedback on the performance of the two AI assistants", "score")]

if __name__ == "__main__":
    main()
