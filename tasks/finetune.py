"""Fine-tune the target on the dataset (paper §5, A.4): one task, cached on the dataset's hash and the settings.

The training itself is idempotent by its key (HOME/finetune/<key>), so a rerun that misses Prefect's cache
still neither retrains a finished model nor restarts a killed one from zero. No retries: a failed training
is rerun by the user, and then resumes from its last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from codeclm.settings import StageSettings
from codeclm.train.finetune import FinetuneResult, plan_finetune, run_finetune
from tasks._base import codec_task


class _ProgressArtifact:
    """The task's progress artifact, moved by training step (local) or job state (remote), at most per percent."""

    def __init__(self) -> None:
        self.id = create_progress_artifact(0.0, key="progress-finetune", description="fine-tuning: steps done")
        self.shown = 0.0

    def __call__(self, step: int, total: int, loss: float | None) -> None:
        percent = 100.0 * step / total if total > 0 else 0.0
        if self.id is not None and (percent - self.shown >= 1.0 or step == total):
            update_progress_artifact(self.id, percent)
            self.shown = percent
        if loss is not None:
            get_run_logger().info("step %d/%d · loss %.4f", step, total, loss)


@codec_task("finetune", run_name="finetune · {out}", tags=["role:target"], retries=0)
def finetune(dataset: str, data_sha: str, out: str, settings: StageSettings) -> FinetuneResult:
    """Train the target on DATASET (its sha256 is `data_sha`) into `out`; `data_sha` keys Prefect's cache."""
    plan = plan_finetune(Path(dataset), settings)
    return run_finetune(plan, settings, Path(out), _ProgressArtifact())
