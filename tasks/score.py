"""Contrastive Filtering, part 2 (paper §4.3, Fig. 11): pairwise 1-10 scores in both orders (codeclm.llm.pairwise),
averaged per model."""

from __future__ import annotations

from collections import defaultdict

from codeclm.llm.gateway import Call
from codeclm.llm.pairwise import ORDERS, ScoresOnScale, order_item_id, pair_calls, pair_scores
from codeclm.llm.parsing import parse_two_scores
from codeclm.records import Candidate, Judgement, Response
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read


class ScorePair(ScoresOnScale):
    pass


def _from_text(text: str) -> ScorePair:
    first, second = parse_two_scores(text)
    return ScorePair(score_1=first, score_2=second)


def score_calls(cand: Candidate, strong: str, target: str, settings: StageSettings, structured: bool) -> list[Call]:
    """The scorer's two calls on one candidate's answers, in codeclm.llm.pairwise's ORDERS."""
    return pair_calls("score", question=cand.instruction, strong=strong, target=target, item_id=cand.candidate_id,
                      role=settings.scorer, stage="score", structured=structured, output=ScorePair,
                      text_parser=_from_text, temperature=settings.score_temperature)


def judgement_of(candidate: Candidate, strong_first: ScorePair, target_first: ScorePair) -> Judgement:
    """Each model's two scores (one per shown position) averaged; gap G = strong - target."""
    scores = pair_scores(strong_first, target_first)
    return Judgement(candidate_id=candidate.candidate_id, round=candidate.round, **scores.columns(),
                     strong_mean=scores.strong_mean, target_mean=scores.target_mean,
                     gap=scores.strong_mean - scores.target_mean)


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
    calls = [call for c in cands for call in score_calls(c, answers[c.candidate_id]["strong"],
                                                         answers[c.candidate_id]["target"], settings, structured)]
    results = step.call(calls, {order_item_id(c.candidate_id, o): c.instruction_id for c in cands for o in ORDERS})
    judgements = [judgement_of(c, a.value, b.value)
                  for c, a, b in zip(cands, results[0::2], results[1::2], strict=True) if a.ok and b.ok]
    step.write("judgements", judgements, Judgement)
    return step.finish()
