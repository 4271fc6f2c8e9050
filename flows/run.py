"""Flow `run`: the main job, the whole loop. Generate a CodecLM dataset from seeds, instruction-tune the target on
it, then measure the base and the tuned target against the strong model on the same questions:
OUT/dataset, OUT/model, OUT/eval, and OUT/report.md + OUT/loop.json leading with CRR(base), CRR(tuned) and their
paired difference.

Every step is a subflow inside one `models_ready`, so the embedded model server starts once; with training off
(`finetune.trainer = "off"`) the run evaluates the base target and says that this measures no data.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from codeclm.checks import check_run
from codeclm.eval.evaluation import default_benchmark
from codeclm.eval.loop import LoopRow, compared_targets, loop_markdown, loop_rows, read_questions
from codeclm.llm.embedded import models_ready
from codeclm.ops.cancellation import watch_cancellation
from codeclm.ops.monitor import progress_view
from codeclm.results import RunResult
from codeclm.settings import Settings
from codeclm.storage import write_json, write_text
from codeclm.train.finetune import FinetuneResult, load_dataset
from flows.evaluate import evaluate
from flows.finetune import finetune
from flows.generate import generate

ROLES = ("strong", "target", "judge")
DEFAULT_LIMIT = 8


@flow(name="codeclm-run", flow_run_name="run · {seeds} → {out}", log_prints=True, on_running=[watch_cancellation])
def run(seeds: str, out: str, settings: Settings | None = None, benchmarks: list[str] | None = None,
        limit: int | None = DEFAULT_LIMIT) -> RunResult:
    """Dataset, tuned model and CRR of base and tuned; bad seeds, benchmarks or training setup fail before any call."""
    settings = settings or Settings()
    benchmarks = benchmarks or [default_benchmark()]
    root = check_run(seeds, out, settings, benchmarks, limit)  # already done when the CLI started this flow
    training = settings.finetune.trainer != "off"
    with progress_view("run-progress", f"run · {seeds} → {out}"), models_ready(settings, ROLES):
        dataset = generate(seeds, str(root / "dataset"), settings)
        data_sha = load_dataset(root / "dataset").sha
        tuned: FinetuneResult | None = None
        if not training:
            evaluation = evaluate(benchmarks, str(root / "eval"), settings=settings, limit=limit)
            rows: list[LoopRow] = []
        else:
            tuned = finetune(str(root / "dataset"), str(root / "model"), settings)
            with compared_targets(tuned, settings) as (base, tuned_role):
                evaluation = evaluate(benchmarks, str(root / "eval"), targets=[base, tuned_role], settings=settings,
                                      limit=limit)
            rows = loop_rows(read_questions(root / "eval"), base.model, tuned_role.model)
    report = loop_markdown(rows, tuned, str(root / "dataset"), data_sha)
    write_text(root / "report.md", report)
    write_json(root / "loop.json", {"data_sha": data_sha, "trained": training, "loop": [r.model_dump() for r in rows],
                                    "model": tuned.model_dump() if tuned else None})
    create_markdown_artifact(report, key="run-report", description="CRR of base and tuned target, paired change")
    for r in rows:
        print(f"{r.benchmark}: CRR base {r.crr_base:.2f}% → tuned {r.crr_tuned:.2f}% ({r.delta:+.2f} pp, 95% paired "
              f"CI {r.ci_low:+.1f} to {r.ci_high:+.1f}, {r.questions} questions)")
    return RunResult(out=str(root), dataset=dataset, data_sha=data_sha, model=tuned, evaluation=evaluation.results,
                     loop=rows, report=str(root / "report.md"))
