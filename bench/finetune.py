"""Fine-tuning time on this machine: LoRA on the embedded SmolLM2-135M, the issue's reference workload.

    .venv/bin/python bench/finetune.py --pairs 32 --steps 4 --batch 8

Pairs are made from data/seeds.parquet (each instruction with a fixed short answer), trained without Prefect
through `codeclm.train.finetune.run_finetune` in a fresh home, so the one-time GGUF conversion is timed on its own.
Prints JSON: seconds for the conversion and for the training steps, and the loss before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from codeclm.settings import Settings
from codeclm.train.finetune import plan_finetune, run_finetune

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    seeds = pd.read_parquet(ROOT / "data" / "seeds.parquet")["instruction"].tolist()
    with tempfile.TemporaryDirectory(prefix="codeclm-bench-ft-") as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": seeds[i % len(seeds)] + ("" if i < len(seeds) else f" (variant {i})")},
            {"role": "assistant", "content": f"Here is a short, careful answer number {i}."}]}) + "\n"
            for i in range(args.pairs)))
        settings = Settings(home=Path(tmp) / "home", finetune={
            "max_steps": args.steps, "batch_size": args.batch, "micro_batch_size": args.batch, "threads": args.threads})
        plan = plan_finetune(data, settings)
        steps: list[float] = []
        started = time.monotonic()
        result = run_finetune(plan, settings, Path(tmp) / "out", lambda step, total, loss: loss is None or steps.append(
            time.monotonic()))
        total = time.monotonic() - started
    print(json.dumps({
        "pairs": args.pairs, "threads": args.threads or os.cpu_count(), "steps": result.steps, "batch": args.batch,
        "precision": result.precision,
        "first_step_done_s": round(steps[0] - started, 1), "later_steps_s": round(steps[-1] - steps[0], 1),
        "seconds_per_step_after_first": round((steps[-1] - steps[0]) / max(1, len(steps) - 1), 2),
        "total_s": round(total, 1), "loss": [result.first_loss, result.final_loss]}))


if __name__ == "__main__":
    main()
