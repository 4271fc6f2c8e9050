"""Closing the loop (paper §5, A.4): the base target and the target tuned on the generated data, answered on the
same questions and compared by a paired bootstrap, so the CRR change is what the data did. No Prefect here."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydantic import BaseModel

from codeclm.crr import paired_difference
from codeclm.eval_records import EvalQuestionResult
from codeclm.finetune import FinetuneResult
from codeclm.settings import RoleConfig, Settings
from codeclm.storage import read_records

BASE_NAME = "base"
NO_TRAINING = ("training is off (finetune.trainer = 'off'): this CRR is of the base target, which never saw the "
               "dataset, so it measures the model, not the data")


class LoopRow(BaseModel):
    """One benchmark: CRR of the base and the tuned target on the questions both had judged, and the difference
    (tuned − base, percentage points) with its paired 95% bootstrap interval."""

    benchmark: str
    base: str
    tuned: str
    questions: int
    crr_base: float
    crr_tuned: float
    delta: float
    ci_low: float
    ci_high: float


@contextlib.contextmanager
def compared_targets(tuned: FinetuneResult, settings: Settings) -> Iterator[tuple[RoleConfig, RoleConfig]]:
    """The base and tuned target as roles to evaluate. Local: both checkpoints on one server codeclm starts
    (the base as the plain checkpoint the LoRA trained from, so quantization and serving are the same on both
    sides); remote: the provider serves both. Answers keep the target's own temperature and length."""
    role = settings.target.model_copy(update={"api_key_env": None, "output_mode": "text", "context_tokens": None})
    if tuned.trainer == "remote":
        remote = settings.target.model_copy(update={"model": tuned.remote_model,
                                                    "api_base": tuned.remote_api_base or settings.target.api_base})
        yield settings.target, remote
        return
    from codeclm.serving import serve_finetuned

    base_name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{BASE_NAME}-{tuned.base_model}")[:64]
    with serve_finetuned(tuned, settings.home, base_name=base_name) as served:
        # named by checkpoint, not port: a rerun on another port still finds its answers in the call cache
        yield (role.model_copy(update={"model": f"openai/{base_name}", "api_base": served.api_base,
                                       "identity": f"served:{tuned.base_checkpoint}"}),
               role.model_copy(update={"model": f"openai/{tuned.served_name}", "api_base": served.api_base,
                                       "identity": f"served:finetune:{tuned.key}"}))


def loop_rows(questions: Sequence[EvalQuestionResult], base: str, tuned: str) -> list[LoopRow]:
    """Per benchmark, the paired CRR difference over the questions judged for both targets."""
    verdicts: dict[tuple[str, str], dict[str, str]] = {}
    for row in questions:
        if row.outcome != "failed" and row.target_model in (base, tuned):
            verdicts.setdefault((row.benchmark, row.question_id), {})[row.target_model] = row.outcome
    rows = []
    for benchmark in dict.fromkeys(b for b, _ in verdicts):
        both = [v for (b, _), v in verdicts.items() if b == benchmark and len(v) == 2]
        if not both:
            continue
        paired = paired_difference([v[base] for v in both], [v[tuned] for v in both])
        rows.append(LoopRow(benchmark=benchmark, base=base, tuned=tuned, questions=paired.questions,
                            crr_base=paired.crr_a, crr_tuned=paired.crr_b, delta=paired.delta,
                            ci_low=paired.ci_low, ci_high=paired.ci_high))
    return rows


def read_questions(eval_dir: Path) -> list[EvalQuestionResult]:
    return read_records(eval_dir / "questions.parquet", EvalQuestionResult)


def loop_markdown(rows: Sequence[LoopRow], tuned: FinetuneResult | None, dataset: str, data_sha: str) -> str:
    """The run's report: what the data did to the target, leading with base, tuned and the paired change."""
    lines = ["# CodecLM run: what the data did", ""]
    if tuned is None:
        return "\n".join([*lines, f"> **Note:** {NO_TRAINING}.", "", f"Dataset: `{dataset}` (train.jsonl sha256 "
                          f"`{data_sha[:16]}`). CRR of the base target: see `eval/report.md`.", ""])
    how = "reused" if tuned.cached else f"{tuned.steps} steps, {tuned.seconds:.0f} s"
    lines += [f"Target `{tuned.base_model}` instruction-tuned ({tuned.trainer}, {how}) on {tuned.pairs} pairs of the "
              f"dataset `{dataset}` (train.jsonl sha256 `{data_sha[:16]}`), then base and tuned answered the same "
              "questions against the strong model.", "",
              "| benchmark | questions | CRR base % | CRR tuned % | change (pp) | 95% paired CI |",
              "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r.benchmark} | {r.questions} | {r.crr_base:.2f} | {r.crr_tuned:.2f} | {r.delta:+.2f} "
              f"| {r.ci_low:+.1f} to {r.ci_high:+.1f} |" for r in rows]
    lines += ["", "The interval resamples questions with base and tuned verdicts kept together, so question "
              "difficulty cancels; an interval that contains 0 is no evidence either way. Per question: "
              "`eval/questions.parquet`; the model: `model/`.", ""]
    return "\n".join(lines)
