"""`codeclm generate` at default settings against a plain asyncio litellm loop sending as many calls flat.

Everything runs as separate processes on one machine: a loopback FakeLLMServer (fixed latency, N slots, optional
faults), the `codeclm generate` command exactly as a user runs it (every setting default except where the models
are: model, api_base, and output_mode = json_schema because the fake server fills JSON schemas), and a plain
client: `asyncio` + `litellm.acompletion`, a semaphore at the server's capacity, no dependencies between calls,
sending the very request bodies the flow sent (so both sides pay the same per-request work), retrying any
failure until it succeeds. The plain client is what a user compares against: all calls known up front, no
cache, no Prefect, no stage order.

Scenarios: `plain` (latency, slots), `hang` (1 % of requests never answer; both sides use the default 120 s
timeout), `429` (the server answers 429 to requests beyond 16 in flight; the plain client sends at 16, the
server's capacity). For `plain` the finished run is started again (requests and seconds of the rerun), and the
Prefect task runs are counted. `--scale 10000` runs generate on that many seeds too, for peak RSS.

    .venv/bin/python bench/throughput.py [--seeds 1000] [--latency 0.2] [--slots 32] [--scenarios plain,hang,429]
                                         [--scale 10000] [--json figures.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TOPICS = ["recursion", "photosynthesis", "inflation", "haiku", "SQL joins", "first aid", "budgeting", "gravity",
          "negotiation", "sourdough", "version control", "volcanoes", "compound interest", "sonnets", "HTTP caching",
          "sleep hygiene", "prime numbers", "public speaking", "composting", "unit testing"]
ASKS = ["Explain {t} to a beginner.", "Write a short poem about {t}.", "List common mistakes people make with {t}.",
        "Give a step-by-step guide to {t}.", "Compare two approaches to {t}."]
TIMEOUT = 120.0  # the default per-attempt timeout of a role; the plain client uses the same


def write_seeds(n: int, path: Path) -> Path:
    """n distinct seed instructions written for this benchmark."""
    import pandas as pd

    rows = [{"seed_id": f"b{i:05d}", "instruction": f"{ASKS[i % len(ASKS)].format(t=TOPICS[i % len(TOPICS)])} "
             f"(variant {i})"} for i in range(n)]
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """The fake server in its own process, so its work does not share a GIL with either client."""

    def __init__(self, work: Path, latency: float, slots: int, max_inflight: int | None,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        args = [PYTHON, "-m", "codeclm.testing.fake_llm", "--port", str(self.port), "--latency", str(latency),
                "--slots", str(slots), "--keep-bodies", *extra]
        if max_inflight:
            args += ["--max-inflight", str(max_inflight)]
        self.proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                     stderr=(work / "server.log").open("wb"))
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # the URL, printed once listening
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def get(self, path: str) -> Any:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=120).json()

    def post(self, path: str, body: Any) -> Any:
        return httpx.post(f"http://127.0.0.1:{self.port}{path}", json=body, timeout=30).json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CODECLM_"))}
    return env | {"PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"} | extra


def config(work: Path, url: str) -> Path:
    """Where the models are; nothing else is set, so every other setting is its default."""
    path = work / "bench.toml"
    path.write_text("".join(f'[{role}]\nmodel = "openai/bench-{role}"\napi_base = "{url}"\n'
                            f'output_mode = "json_schema"\n\n' for role in ("strong", "target")))
    return path


def run_generate(work: Path, seeds: Path, out: Path, cfg: Path, flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """`codeclm generate` as a user runs it; wall seconds, exit code and peak RSS of the process."""
    env = _env(CODECLM_HOME=str(work / "home"), PREFECT_HOME=str(work / "prefect"))
    log = (work / f"generate-{time.time_ns()}.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen([PYTHON, "-m", "codeclm.cli", "generate", str(seeds), "--out", str(out), "--config",
                             str(cfg), *flags], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    ended = time.monotonic()
    if proc.returncode != 0:
        raise SystemExit(f"codeclm generate exited {proc.returncode}; see {log.name}")
    return {"started": started, "ended": ended, "seconds": ended - started, "peak_rss_mb": usage.ru_maxrss / 1024}


def run_plain(work: Path, url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """The plain client in its own process (see `plain_client`)."""
    path = work / "bodies.json"
    path.write_text(json.dumps(bodies))
    started = time.monotonic()
    done = subprocess.run([PYTHON, __file__, "--plain-client", url, str(path), str(concurrency)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"started": started,
                                                              "process_seconds": time.monotonic() - started}


def plain_client(url: str, bodies_path: Path, concurrency: int) -> None:
    """Send every body with `litellm.acompletion`, `concurrency` at a time, retrying failures until each is
    answered; print seconds from the first request to the last answer."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    litellm.suppress_debug_info = True
    bodies = json.loads(bodies_path.read_text())
    gate = asyncio.Semaphore(concurrency)
    retries = 0

    async def one(body: dict[str, Any]) -> None:
        nonlocal retries
        kwargs = {k: v for k, v in body.items() if k in ("messages", "temperature", "max_tokens", "response_format")}
        for attempt in range(50):
            async with gate:
                try:
                    await litellm.acompletion(model=f"openai/{body['model']}", api_base=url, api_key="sk-bench",
                                              timeout=TIMEOUT, max_retries=0, num_retries=0, **kwargs)
                    return
                except Exception:
                    retries += 1
            await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt))
        raise RuntimeError("a call failed 50 times")

    async def main() -> float:
        started = time.monotonic()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.monotonic() - started

    seconds = asyncio.run(main())
    print(json.dumps({"calls": len(bodies), "seconds": seconds, "retries": retries}))


def task_runs(prefect_home: Path, flow_run_id: str) -> int:
    """Task runs of a generate flow run and its subflows, from Prefect's database."""
    db = sqlite3.connect(prefect_home / "prefect.db")
    runs, todo = {flow_run_id}, [flow_run_id]
    while todo:
        parent = todo.pop()
        for (child,) in db.execute("SELECT f.id FROM flow_run f JOIN task_run t ON f.parent_task_run_id = t.id "
                                   "WHERE t.flow_run_id = ?", (parent,)):
            runs.add(child)
            todo.append(child)
    marks = ",".join("?" * len(runs))
    return int(db.execute(f"SELECT count(*) FROM task_run WHERE flow_run_id IN ({marks})", tuple(runs)).fetchone()[0])


def warm_prefect(work: Path) -> None:
    """Create Prefect's database once (migrations), as on any machine that has run Prefect before."""
    code = "from prefect import flow\n@flow\ndef warm():\n    return 1\nwarm()\n"
    subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=_env(PREFECT_HOME=str(work / "prefect")), check=True,
                   capture_output=True)


def scenario(name: str, n_seeds: int, latency: float, slots: int, rerun: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"codeclm-bench-{name}-"))
    seeds = write_seeds(n_seeds, work / "seeds.parquet")
    max_inflight = 16 if name == "429" else None
    server = Server(work, latency, slots, max_inflight)
    try:
        if name == "hang":
            server.post("/_faults", [{"kind": "hang", "rate": 0.01}])
        warm_prefect(work)
        run = run_generate(work, seeds, work / "out", config(work, server.url))
        stats = server.get("/_stats")
        log = server.get("/_log")
        manifest = json.loads((work / "out" / "manifest.json").read_text())
        answered = [e for e in log if e["status"] == 200]
        t_first = min(e["t"] for e in log)
        late = [e for e in log if e["t"] >= t_first + 60]
        figures: dict[str, Any] = {
            "scenario": name, "seeds": n_seeds,
            "flow_calls": len(answered), "flow_requests": len(log), "flow_seconds": round(run["seconds"], 1),
            "flow_calls_per_s": round(len(answered) / run["seconds"], 1),
            "flow_calls_per_s_first_to_last": round(len(answered) / (stats["last_t_end"] - t_first), 1),
            "seconds_to_first_call": round(t_first - run["started"], 1),
            "seconds_after_last_call": round(run["ended"] - stats["last_t_end"], 1),
            "flow_max_in_flight": stats["max_inflight"],
            "flow_429_share_after_60s": round(sum(e["status"] == 429 for e in late) / max(1, len(late)), 4),
            "flow_429": sum(e["status"] == 429 for e in log),
            "flow_failed_calls": manifest["totals"]["failed"], "train_pairs": manifest["counts"]["train"],
            "peak_rss_mb": round(run["peak_rss_mb"]),
            "final_limits": {c["endpoint"].split("@")[0]: c["limit"] for c in manifest.get("concurrency", [])},
            "task_runs": task_runs(work / "prefect", manifest["run"]["flow_run_id"]),
        }
        figures["task_runs_per_1000_seeds"] = round(figures["task_runs"] * 1000 / n_seeds, 1)
        if rerun:
            server.post("/_reset", {})
            again = run_generate(work, seeds, work / "out", config(work, server.url))
            figures |= {"rerun_seconds": round(again["seconds"], 1),
                        "rerun_requests": server.get("/_stats")["requests"]}
        if name != "scale":
            server.post("/_reset", {})
            if name == "hang":
                server.post("/_faults", [{"kind": "hang", "rate": 0.01}])
            plain = run_plain(work, server.url, [e["body"] for e in answered], max_inflight or slots)
            after = server.get("/_stats")
            figures |= {"plain_calls": plain["calls"], "plain_seconds": round(plain["seconds"], 1),
                        "plain_calls_per_s": round(plain["calls"] / plain["seconds"], 1),
                        "plain_process_seconds": round(plain["process_seconds"], 1),
                        "plain_process_calls_per_s": round(plain["calls"] / plain["process_seconds"], 1),
                        "plain_seconds_to_first_call": round(after["first_t"] - plain["started"], 1),
                        "plain_max_in_flight": after["max_inflight"], "plain_retries": plain["retries"]}
            # whole commands (both start Python and import litellm; ours also Prefect) ...
            figures["ratio"] = round(figures["flow_calls_per_s"] / figures["plain_process_calls_per_s"], 3)
            # ... ours whole against the plain loop's sending alone (the strictest) ...
            figures["ratio_vs_sending_only"] = round(figures["flow_calls_per_s"] / figures["plain_calls_per_s"], 3)
            # ... and first request to last answer on both sides
            figures["ratio_first_to_last"] = round(figures["flow_calls_per_s_first_to_last"]
                                                   / figures["plain_calls_per_s"], 3)
        return figures
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--scenarios", default="plain,hang,429")
    parser.add_argument("--scale", type=int, default=0, help="also run generate on this many seeds (peak RSS)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plain-client", nargs=3, metavar=("URL", "BODIES", "CONCURRENCY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_client:
        url, bodies, concurrency = args.plain_client
        plain_client(url, Path(bodies), int(concurrency))
        return

    results = []
    for name in [s for s in args.scenarios.split(",") if s]:
        results.append(scenario(name, args.seeds, args.latency, args.slots, rerun=name == "plain"))
        print(json.dumps(results[-1]), flush=True)
    if args.scale:
        results.append(scenario("scale", args.scale, args.latency, args.slots, rerun=False))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
