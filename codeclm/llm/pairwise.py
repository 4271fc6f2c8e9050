"""Pairwise judging in both orders, one helper and one column convention for Contrastive Filtering's scoring
(tasks/score.py, paper §4.3) and CRR judging (tasks/judge.py, paper §5.3).

A judge sees two answers as Assistant 1 and Assistant 2 and returns `score_1` and `score_2`. Every pair is
judged twice to cancel position bias: order `strong_first` shows the strong model's answer as Assistant 1,
order `target_first` shows the target's. Columns are named by role and by the position that model's answer had:

  strong_score_first   the strong answer's score when it was shown first   (order strong_first, score_1)
  target_score_second  the target answer's score when it was shown second  (order strong_first, score_2)
  target_score_first   the target answer's score when it was shown first   (order target_first, score_1)
  strong_score_second  the strong answer's score when it was shown second  (order target_first, score_2)

Each model is shown first once and second once; a judge that favours Assistant 1 raises both `*_first` columns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, model_validator

from codeclm.errors import ParseError
from codeclm.llm.gateway import Call, Reply
from codeclm.llm.parsing import scores_on_scale
from codeclm.llm.prompts import load_prompt

Order = Literal["strong_first", "target_first"]
ORDERS: tuple[Order, Order] = ("strong_first", "target_first")
SCORE_COLUMNS = ("strong_score_first", "strong_score_second", "target_score_first", "target_score_second")


class TwoScores(Protocol):
    """A judge's reply: Assistant 1's and Assistant 2's scores."""

    score_1: float
    score_2: float


class ScoresOnScale(BaseModel):
    """A judge's reply on the prompts' 1-10 scale, as a JSON schema; a score just outside the scale is read by the
    stated rule of `codeclm.llm.parsing.scores_on_scale` (the schema keeps its bounds: the call key is unchanged).
    Subclasses set their own docstring: it is the schema's description."""

    score_1: float = Field(ge=1, le=10)
    score_2: float = Field(ge=1, le=10)

    @model_validator(mode="before")
    @classmethod
    def _on_scale(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        try:
            first, second = float(data["score_1"]), float(data["score_2"])
        except (KeyError, TypeError, ValueError):
            return data  # field validation reports what is missing or not a number
        try:
            first, second = scores_on_scale(first, second)
        except ParseError as exc:
            raise ValueError(str(exc)) from None
        return {**data, "score_1": first, "score_2": second}


class PairScores(BaseModel):
    """The four scores of one pair judged in both orders, by role and shown position (module docstring)."""

    strong_score_first: float
    strong_score_second: float
    target_score_first: float
    target_score_second: float

    @property
    def strong_mean(self) -> float:
        return (self.strong_score_first + self.strong_score_second) / 2

    @property
    def target_mean(self) -> float:
        return (self.target_score_first + self.target_score_second) / 2

    def columns(self) -> dict[str, float]:
        """The four score columns, for a record that carries them."""
        return self.model_dump(include=set(SCORE_COLUMNS))


def order_item_id(item_id: str, order: Order) -> str:
    """The item id of one order's call (and of its failed-call row): `<item>#strong_first`."""
    return f"{item_id}#{order}"


def pair_calls(prompt_name: str, *, question: str, strong: str, target: str, item_id: str, role: str, stage: str,
               structured: bool, output: type[BaseModel], text_parser: Callable[[str], BaseModel],
               temperature: float | None = None, reply: Reply = Reply.STRUCTURED) -> list[Call]:
    """The two calls judging one pair, in ORDERS order: the strong answer as Assistant 1, then the target's."""
    prompt = load_prompt(prompt_name)
    shown = {"strong_first": (strong, target), "target_first": (target, strong)}
    return [Call(role=role, messages=prompt.render(structured=structured, question=question, answer_1=shown[order][0],
                                                   answer_2=shown[order][1]),
                 output=output, text_parser=text_parser, prompt_version=prompt.version, stage=stage,
                 item_id=order_item_id(item_id, order), temperature=temperature, reply=reply)
            for order in ORDERS]


def pair_scores(strong_first: TwoScores, target_first: TwoScores) -> PairScores:
    """Map the two verdicts (in ORDERS order) back to the models they scored."""
    return PairScores(strong_score_first=strong_first.score_1, target_score_second=strong_first.score_2,
                      target_score_first=target_first.score_1, strong_score_second=target_first.score_2)
