"""CRR evaluation, step 1: the strong model and each target answer every benchmark question.

Answers go through `answer_calls`, the generation flow's own answering calls, so a question that was also
a generated instruction costs nothing twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Literal

from codeclm.benchmarks import BenchmarkQuestion
from codeclm.eval.eval_records import EvalAnswer, EvalQuestion
from codeclm.settings import Settings, StageSettings
from codeclm.storage import write_records
from tasks._base import Outputs, Ref, Step, codec_task, read, ref_to
from tasks.respond import answer_calls

AnswerRole = Literal["strong", "target"]


def item_id(benchmark: str, question_id: str) -> str:
    return f"{benchmark}/{question_id}"


def question_batches(questions: Sequence[BenchmarkQuestion], settings: Settings | StageSettings) -> list[Ref]:
    """The questions as content-addressed Parquet batches, so task caches follow the questions' content."""
    rows = [EvalQuestion(**q.model_dump()) for q in questions]
    blob = json.dumps([r.model_dump() for r in rows], sort_keys=True).encode()
    folder = settings.work_dir / "eval-questions" / hashlib.sha256(blob).hexdigest()[:20]
    size = settings.batch_size
    refs = []
    for number, start in enumerate(range(0, len(rows), size)):
        path = folder / f"batch-{number:04d}-of-{size}.parquet"
        refs.append(ref_to(path if path.exists() else write_records(path, rows[start:start + size], EvalQuestion)))
    return refs


@codec_task("answer", run_name="{name} {role} · {batch}", tags=["eval"])
def answer(questions: Ref, settings: StageSettings, role: AnswerRole, batch: str) -> Outputs:
    """One role's answers to a batch; a failed answer keeps its reason, and its question fails later."""
    step = Step("answer", batch, settings, questions=questions["sha"], role=role)
    if (done := step.done()) is not None:
        return done
    rows = read(questions, EvalQuestion)
    calls = answer_calls([(item_id(q.benchmark, q.question_id), q.prompt) for q in rows], role, "answer")
    model = settings.role(role).model
    answers = [EvalAnswer(benchmark=q.benchmark, question_id=q.question_id, role=role, model=model,
                          text=r.value if r.ok else None, failure=None if r.ok else f"{r.error_type}: {r.message}")
               for q, r in zip(rows, step.call(calls), strict=True)]
    step.write("answers", answers, EvalAnswer)
    return step.finish()
