"""The judge check: before the protocol spends anything on data, the judge must tell a good answer from a worse
one whose order is known. A judge that rates position (the embedded SmolLM2 does) would make every cell of
Table 1 a coin toss; it is caught here, in seconds, instead of after thousands of calls.

Each check question gives up to two pairs, the strong model's answer (intact) against:
  first_sentence  the same answer cut to its first sentence (when it has more than one), and
  other_answer    the strong model's answer to the next check question (an answer to another question).
Each pair is judged in both orders (codeclm.llm.pairwise: the intact answer as Assistant 1, then as 2), with the
final judge's own template and mode; the figure is the share of judged orders whose intact answer scored
higher. A judge that only rates position prefers the intact answer in half of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel

from codeclm.records import Record

CheckKind = Literal["first_sentence", "other_answer"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class CheckPair(BaseModel):
    """One pair whose better answer is known: `intact` is better than `degraded`."""

    pair_id: str
    kind: CheckKind
    question: str
    intact: str
    degraded: str


class JudgeCheckRow(Record):
    """One judged order of a check pair: the two scores and whether the intact answer won; a failed judgement
    has `failure` and counts as not preferring it."""

    table: ClassVar[str] = "judge_check"
    pair_id: str
    kind: str
    order: str
    intact_score: float | None = None
    degraded_score: float | None = None
    prefers_intact: bool = False
    failure: str | None = None


class JudgeCheck(BaseModel):
    """The check's outcome, as the report and protocol.json state it."""

    figure: float  # share of judged orders preferring the intact answer, 0-1
    orders: int
    pairs: int
    minimum: float
    passed: bool
    skipped: bool  # refused, but the run went on because --skip-judge-check was given
    judge: str
    template: str
    mode: str

    def line(self) -> str:
        verdict = "passed" if self.passed else ("FAILED, overridden by --skip-judge-check" if self.skipped
                                                else "FAILED")
        return (f"judge check {verdict}: `{self.judge}` preferred the intact answer in {self.figure:.0%} of "
                f"{self.orders} judged orders ({self.pairs} pairs, both orders; at least {self.minimum:.0%} needed)")


def first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0].strip()


def check_pairs(questions: Sequence[tuple[str, str]], answers: Sequence[str | None]) -> list[CheckPair]:
    """The check's pairs from (item id, question) and the strong model's answers (None: that answer failed)."""
    pairs = []
    answered = [(item, q, a) for (item, q), a in zip(questions, answers, strict=True) if a and a.strip()]
    for i, (item, question, answer) in enumerate(answered):
        cut = first_sentence(answer)
        if cut and cut != answer.strip():
            pairs.append(CheckPair(pair_id=f"{item}#first_sentence", kind="first_sentence", question=question,
                                   intact=answer, degraded=cut))
        if len(answered) > 1:
            other = answered[(i + 1) % len(answered)][2]
            if other.strip() != answer.strip():
                pairs.append(CheckPair(pair_id=f"{item}#other_answer", kind="other_answer", question=question,
                                       intact=answer, degraded=other))
    return pairs


def figure(rows: Sequence[JudgeCheckRow]) -> float:
    """The share of orders preferring the intact answer (a failed judgement counts against); 0 without rows."""
    return sum(r.prefers_intact for r in rows) / len(rows) if rows else 0.0
