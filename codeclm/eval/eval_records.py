"""Rows the CRR evaluation writes: questions, answers, per-question verdicts and the per-cell summary."""

from __future__ import annotations

from typing import ClassVar, Literal

from codeclm.eval.crr import CRRSummary
from codeclm.records import Record

Outcome = Literal["win", "tie", "loss", "failed"]


class EvalQuestion(Record):
    """One benchmark question as the evaluation tasks read it."""

    table: ClassVar[str] = "eval_questions"
    benchmark: str
    question_id: str
    prompt: str
    category: str | None = None


class EvalAnswer(Record):
    """One model's answer to a benchmark question (`model` is the model string the user gave), or why there
    is none: `text` is None and `failure` holds the last error."""

    table: ClassVar[str] = "eval_answers"
    benchmark: str
    question_id: str
    role: Literal["strong", "target"]
    model: str
    text: str | None = None
    failure: str | None = None


class EvalQuestionResult(Record):
    """The judged comparison of one question, judged in both orders (codeclm.llm.pairwise).

    A question whose answer or judgement failed has outcome `failed`, no scores, the reason in `failure` and
    the judge's last raw output in `judge_output`: it is left out of the CRR denominator and counted apart,
    never turned into a tie.
    """

    table: ClassVar[str] = "eval_questions_judged"
    benchmark: str
    question_id: str
    prompt: str
    target_model: str
    strong_model: str
    judge_model: str
    target_answer: str | None = None
    strong_answer: str | None = None
    strong_score_first: float | None = None  # scores by role and shown position (codeclm.llm.pairwise)
    strong_score_second: float | None = None
    target_score_first: float | None = None
    target_score_second: float | None = None
    explanation_strong_first: str | None = None
    explanation_target_first: str | None = None
    outcome: Outcome
    flipped: bool | None = None
    failure: str | None = None
    judge_output: str | None = None


class LeaderboardRow(CRRSummary):
    """One benchmark x target of an evaluation: its CRR summary (`CRRSummary`) with what was compared.

    `total` is the number of judged questions (the CRR denominator); `failures` are the questions that could
    not be judged. CRR and its bounds are percentages; lengths are mean answer lengths in characters.
    """

    benchmark: str
    target: str
    strong: str
    judge: str
    failures: int
    judge_is_strong: bool


class EvalSummary(Record, LeaderboardRow):
    """A leaderboard row as `summary.parquet` stores it: with the rule that turned two judged orders into one
    outcome."""

    table: ClassVar[str] = "eval_summary"
    rule: str
