"""Flow `finetune`: train the target on a published dataset and publish the tuned model into OUT.

check the request (dataset, base model, extra, memory) -> train or reuse (task) -> loss table and chart.
Orchestration only; the work is `tasks.finetune` and `codeclm.train.finetune`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from codeclm.eval.eval_report import data_uri
from codeclm.ops.cancellation import watch_cancellation
from codeclm.settings import Settings
from codeclm.train.finetune import (
    LOG_FILE,
    FinetuneResult,
    is_published,
    loss_svg,
    plan_finetune,
    read_log,
    recipe_warning,
    report_markdown,
)
from tasks.finetune import finetune as finetune_task


# log_prints off, even inside a flow that has it on: dill (under datasets) captures `dis` output through print
@flow(name="codeclm-finetune", flow_run_name="finetune · {dataset} → {out}", log_prints=False,
      on_running=[watch_cancellation])
def finetune(dataset: str, out: str, settings: Settings | None = None) -> FinetuneResult:
    """The tuned model in OUT (local: merged checkpoint and adapter; remote: the provider's model id)."""
    settings = settings or Settings()
    plan = plan_finetune(Path(dataset), settings)
    get_run_logger().info("recipe: %s", plan.recipe)
    if warning := recipe_warning(settings):
        get_run_logger().warning(warning)
    state = finetune_task(dataset, plan.dataset.sha, out, settings.for_stage("finetune"), return_state=True)
    result = state.result()
    if state.name == "Cached":
        result = result.model_copy(update={"cached": True})
    if not is_published(result):  # Prefect's cache remembers a DIR that has since been removed or replaced
        result = finetune_task.with_options(refresh_cache=True)(dataset, plan.dataset.sha, out,
                                                               settings.for_stage("finetune"))
    rows = read_log(Path(result.out) / LOG_FILE)
    create_markdown_artifact(report_markdown(result, rows, data_uri(loss_svg(rows))), key="finetune-report",
                             description="fine-tuning: loss by step")
    get_run_logger().info("tuned %s on %d pairs: %s (loss %s → %s, %d steps%s)", result.base_model, result.pairs,
                          result.merged_model or result.remote_model, result.first_loss, result.final_loss,
                          result.steps, ", reused" if result.cached else "")
    return result
