"""Closing the loop (paper §5, A.4): the base target and the target tuned on the generated data, answered on the
same questions and compared by a paired bootstrap, so the CRR change is what the data did. No Prefect here."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel

from codeclm.errors import ModelError
from codeclm.eval.crr import paired_difference
from codeclm.eval.eval_records import EvalQuestionResult
from codeclm.settings import RoleConfig, Settings
from codeclm.storage import read_records
from codeclm.train.finetune import FinetuneResult

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
    """The base and tuned target as roles to evaluate (one tuned model: `served_targets`)."""
    with served_targets({"tuned": tuned}, settings) as (base, roles):
        yield base, roles["tuned"]


@contextlib.contextmanager
def served_targets(tuned: Mapping[str, FinetuneResult], settings: Settings
                   ) -> Iterator[tuple[RoleConfig, dict[str, RoleConfig]]]:
    """The base target and every tuned one (by label) as roles to evaluate. Local: all checkpoints on one server
    codeclm starts (the base as the plain checkpoint the LoRAs trained from, so quantization and serving are the
    same on every side); remote: the provider serves them. Answers keep the target's own temperature and length."""
    role = settings.target.model_copy(update={"api_key_env": None, "output_mode": "text", "context_tokens": None})
    remote = {label: t for label, t in tuned.items() if t.trainer == "remote"}
    if remote:
        if len(remote) != len(tuned):
            raise ModelError("tuned models from the local and the remote trainer cannot be compared in one run")
        yield settings.target, {label: settings.target.model_copy(update={
            "model": t.remote_model, "api_base": t.remote_api_base or settings.target.api_base})
            for label, t in tuned.items()}
        return
    from codeclm.train.serving import pick_backend, serve_models

    bases = {t.base_checkpoint for t in tuned.values()}
    if len(bases) != 1 or None in bases or not all(t.merged_model for t in tuned.values()):
        raise ModelError(f"tuned models to compare must share one local base checkpoint, got {sorted(map(str, bases))}")
    first = next(iter(tuned.values()))
    base_name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{BASE_NAME}-{first.base_model}")[:64]
    base = {base_name: Path(str(first.base_checkpoint))}
    backend = pick_backend()
    if backend == "vllm" and all(t.adapter for t in tuned.values()):  # one base, each tuned model as a LoRA
        models, adapters = base, {t.served_name: Path(str(t.adapter)) for t in tuned.values()}
    else:
        models, adapters = {**base, **{t.served_name: Path(str(t.merged_model)) for t in tuned.values()}}, {}
    with serve_models(models, settings.home, adapters, backend) as served:
        # named by checkpoint, not port: a rerun on another port still finds its answers in the call cache
        yield (role.model_copy(update={"model": f"openai/{base_name}", "api_base": served.api_base,
                                       "identity": f"served:{first.base_checkpoint}"}),
               {label: role.model_copy(update={"model": f"openai/{t.served_name}", "api_base": served.api_base,
                                               "identity": f"served:finetune:{t.key}"})
                for label, t in tuned.items()})


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
