"""Flow `run`: the main job end to end. Generate a CodecLM dataset from seeds, then measure the target
against the strong model on a benchmark subset: OUT/dataset and OUT/eval.

Both flows run as subflows inside one `models_ready`, so the embedded model server starts once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from codeclm.checks import check_run_output
from codeclm.embedded import models_ready
from codeclm.evaluation import default_benchmark, plan_evaluation
from codeclm.monitor import progress_view
from codeclm.settings import Settings
from flows.evaluate import evaluate
from flows.generate import generate
from tasks.seeds import validate_seeds

ROLES = ("strong", "target", "judge")
DEFAULT_LIMIT = 8


@flow(name="codeclm-run", flow_run_name="run · {seeds} → {out}", log_prints=True)
def run(seeds: str, out: str, settings: Settings | None = None, benchmarks: list[str] | None = None,
        limit: int | None = DEFAULT_LIMIT) -> dict[str, Any]:
    """Dataset into OUT/dataset, CRR evaluation into OUT/eval; bad seeds or benchmarks fail before any call."""
    settings = settings or Settings()
    benchmarks = benchmarks or [default_benchmark()]
    check_run_output(out)
    validate_seeds(Path(seeds), settings)
    plan_evaluation(benchmarks, settings, limit=limit)
    root = Path(out)
    with progress_view("run-progress", f"run · {seeds} → {out}"), models_ready(settings, ROLES):
        dataset = generate(seeds, str(root / "dataset"), settings)
        evaluation = evaluate(benchmarks, str(root / "eval"), settings=settings, limit=limit)
    return {"out": str(root), "dataset": dataset, "evaluation": evaluation}
