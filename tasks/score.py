"""Contrastive Filtering, part 2 (paper §4.3, Fig. 11): pairwise 1-10 scores in both orders, averaged."""

from __future__ import annotations

from collections import defaultdict

from pydantic import BaseModel, Field

from codeclm.gateway import Call
from codeclm.parsing import parse_two_scores
from codeclm.prompts import load_prompt
from codeclm.records import Candidate, Judgement, Response
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read


class ScorePair(BaseModel):
    score_1: float = Field(ge=1, le=10)
    score_2: float = Field(ge=1, le=10)


def _from_text(text: str) -> ScorePair:
    first, second = parse_two_scores(text)
    return ScorePair(score_1=first, score_2=second)


def pair_calls(question: str, item_id: str, strong: str, target: str, role: str, temperature: float,
               stage: str, structured: bool, prompt_name: str = "score") -> list[Call]:
    """Two calls judging the same pair: order A shows the strong answer first, order B the target's."""
    prompt = load_prompt(prompt_name)
    return [Call(role=role,
                 messages=prompt.render(structured=structured, question=question, answer_1=first, answer_2=second),
                 output=ScorePair, text_parser=_from_text, prompt_version=prompt.version, stage=stage,
                 item_id=item_id, temperature=temperature)
            for first, second in ((strong, target), (target, strong))]


def judgement_of(candidate: Candidate, order_a: ScorePair, order_b: ScorePair) -> Judgement:
    """Average each model's two scores; gap G = strong - target."""
    strong_mean = (order_a.score_1 + order_b.score_2) / 2
    target_mean = (order_a.score_2 + order_b.score_1) / 2
    return Judgement(candidate_id=candidate.candidate_id, round=candidate.round,
                     strong_score_a=order_a.score_1, target_score_a=order_a.score_2,
                     strong_score_b=order_b.score_2, target_score_b=order_b.score_1,
                     strong_mean=strong_mean, target_mean=target_mean, gap=strong_mean - target_mean)


@codec_task("score", run_name="{name} r{round} · batch {batch}", tags=["role:strong"])
def score(candidates: Ref, responses: Ref, settings: StageSettings, round: int, batch: str) -> Outputs:
    """Judge every candidate that has both answers."""
    step = Step("score", batch, settings, candidates=candidates["sha"], responses=responses["sha"], round=round)
    if (done := step.done()) is not None:
        return done
    answers: dict[str, dict[str, str]] = defaultdict(dict)
    for r in read(responses, Response):
        answers[r.candidate_id][r.role] = r.text
    cands = [c for c in read(candidates, Candidate) if len(answers[c.candidate_id]) == 2]
    structured = step.structured(settings.scorer)
    calls = [call for c in cands
             for call in pair_calls(c.instruction, c.candidate_id, answers[c.candidate_id]["strong"],
                                    answers[c.candidate_id]["target"], settings.scorer, settings.score_temperature,
                                    "score", structured)]
    results = step.call(calls, {c.candidate_id: c.instruction_id for c in cands})
    judgements = [judgement_of(c, a.value, b.value)
                  for c, a, b in zip(cands, results[0::2], results[1::2], strict=True) if a.ok and b.ok]
    step.write("judgements", judgements, Judgement)
    return step.finish()
