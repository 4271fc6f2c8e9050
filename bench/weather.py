"""`codeclm generate` in bad weather: the fault mix of issue 21 against the clean run and a plain asyncio loop.

Separate processes on one machine, as in bench/throughput.py: a loopback FakeLLMServer (30 ms per answer, 32
slots, plain-text answers to the CodecLM prompts), `codeclm generate SEEDS --budget 300` as a user runs it with
models litellm does not know (`openai/strong`, `openai/target`, so output mode `auto` chooses plain text; every
other setting default), and the plain client of bench/throughput.py (`asyncio` + `litellm.acompletion`, a
semaphore at the server's 32 slots, the flow's own request bodies, every failure retried).

Scenarios, each on a fresh server, home and call cache:

* `clean`: no faults.
* `faults`: each request drawn independently: 10 % 429 without Retry-After, 5 % 500, 1 % no answer for 300 s
  (holding no server slot), 5 % chatty (the answer behind "Sure! Here is what you asked for: ", every `{` as
  `(`), 2 % cut in half with finish_reason "length".
* `held`: the same, but a stalled request holds one of the server's 32 slots for its 300 s (a wedged server).

For `faults` and `held` the plain loop then sends the bodies the flow got answered to the same server with the
same faults. Figures: seconds, requests, failed calls, the limiter's lowest and highest limit, hedges, and the
ratios faulty / clean and flow rate / plain loop rate (whole commands and first request to last answer).

    .venv/bin/python bench/weather.py [--seeds 16] [--budget 300] [--scenarios clean,faults,held] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Server, run_generate, run_plain, warm_prefect, write_seeds

LATENCY = 0.03
SLOTS = 32
# the mix as shares of all requests; rules are tried in order, so each rate is of what is left
MIX: list[tuple[dict[str, Any], float]] = [
    ({"kind": "hang", "seconds": 300}, 0.01), ({"kind": "http", "status": 429}, 0.10),
    ({"kind": "http", "status": 500}, 0.05), ({"kind": "chatty"}, 0.05), ({"kind": "truncate"}, 0.02),
]


def fault_rules(hold_slot: bool) -> list[dict[str, Any]]:
    rules, left = [], 1.0
    for rule, share in MIX:
        extra = {"hold_slot": True} if hold_slot and rule["kind"] == "hang" else {}
        rules.append(rule | extra | {"rate": share / left})
        left -= share
    return rules


def text_config(work: Path, url: str) -> Path:
    """Where the models are, by names litellm does not know; nothing else is set."""
    path = work / "weather.toml"
    path.write_text("".join(f'[{role}]\nmodel = "openai/{role}"\napi_base = "{url}"\n\n'
                            for role in ("strong", "target")))
    return path


def scenario(name: str, seeds_n: int, budget: int, plain: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"codeclm-weather-{name}-"))
    seeds = write_seeds(seeds_n, work / "seeds.parquet")
    server = Server(work, LATENCY, SLOTS, None, extra=("--codeclm-text", "--seed", "21"))
    rules = [] if name == "clean" else fault_rules(hold_slot=name == "held")
    try:
        server.post("/_faults", rules)
        warm_prefect(work)
        run = run_generate(work, seeds, work / "out", text_config(work, server.url), ("--budget", str(budget)))
        stats, log = server.get("/_stats"), server.get("/_log")
        manifest = json.loads((work / "out" / "manifest.json").read_text())
        answered = [e for e in log if e["status"] == 200]
        t_first = min(e["t"] for e in log)
        limits = manifest.get("concurrency", [])
        figures: dict[str, Any] = {
            "scenario": name, "seeds": seeds_n, "budget": budget, "work": str(work),
            "flow_seconds": round(run["seconds"], 1), "flow_requests": len(log), "flow_answered": len(answered),
            "flow_statuses": stats["statuses"], "flow_faults": _count(e["fault"] for e in log),
            "flow_failed_calls": manifest["totals"]["failed"], "train_pairs": manifest["counts"]["train"],
            "basic_instructions": manifest["counts"]["basic_instructions"],
            "flow_max_in_flight": stats["max_inflight"],
            "flow_calls_per_s": round(len(answered) / run["seconds"], 2),
            "flow_calls_per_s_first_to_last": round(len(answered) / (stats["last_t_end"] - t_first), 2),
            "limits": {c["endpoint"].split("@")[0]: {k: c[k] for k in ("min_limit", "max_limit", "limit", "hedges",
                                                                         "decreases", "congestion", "stragglers")}
                       for c in limits},
        }
        if plain and name != "clean":
            server.post("/_reset", {})
            server.post("/_faults", rules)
            result = run_plain(work, server.url, [e["body"] for e in answered], SLOTS)
            figures |= {"plain_seconds": round(result["seconds"], 1),
                        "plain_process_seconds": round(result["process_seconds"], 1),
                        "plain_retries": result["retries"],
                        "ratio": round(figures["flow_calls_per_s"] * result["process_seconds"]
                                       / result["calls"], 3),
                        "ratio_first_to_last": round(figures["flow_calls_per_s_first_to_last"] * result["seconds"]
                                                     / result["calls"], 3)}
        return figures
    finally:
        server.stop()


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--budget", type=int, default=300)
    parser.add_argument("--scenarios", default="clean,faults,held")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for name in [s for s in args.scenarios.split(",") if s]:
        results.append(scenario(name, args.seeds, args.budget, plain=not args.no_plain))
        print(json.dumps(results[-1]), flush=True)
    clean = next((r for r in results if r["scenario"] == "clean"), None)
    if clean:
        for r in results:
            if r is not clean:
                print(f"{r['scenario']}: {r['flow_seconds'] / clean['flow_seconds']:.2f}x the clean time", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
