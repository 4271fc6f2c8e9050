"""Contrastive Filtering, part 3 (paper §4.3): keep a pair when the score gap passes theta, else go round again."""

from __future__ import annotations

import math

from codeclm.llm.pairwise import SCORE_COLUMNS
from codeclm.records import (
    Candidate,
    Decision,
    FilterDecision,
    Judgement,
    RejectedCandidate,
    RejectReason,
    Response,
    TrainingPair,
    content_id,
)
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read


def decide(gap: float, round: int, settings: StageSettings) -> Decision:
    """|G| > theta keeps the better answer (the target's only if allowed); otherwise another Self-Rubrics
    round, or rejection after the last one (the paper leaves that case open; we drop it and say why). A clear
    target win that may not be kept goes round again like a tie: a harder instruction may give a strong win."""
    if abs(gap) > settings.threshold:
        if gap > 0:
            return "keep_strong"
        if settings.keep_target_when_better:
            return "keep_target"
    return "next_round" if round < settings.max_rounds else "reject"


def reject_reason(gap: float, settings: StageSettings) -> RejectReason:
    """Why a last-round candidate ends without a pair: no clear winner, or a clear target win not kept."""
    return "target_better" if gap < -settings.threshold else "below_threshold"


def unfiltered_pair(cand: Candidate, answer: Response, settings: StageSettings) -> TrainingPair:
    """Without Contrastive Filtering (Table 3's ablations): the strong answer is kept as it is; no target answer,
    no scores (NaN), decision keep_strong."""
    nan = math.nan
    return TrainingPair(
        pair_id=content_id("pair", cand.candidate_id), instruction=cand.instruction, response=answer.text,
        response_source="strong", other_response="", instruction_id=cand.instruction_id,
        candidate_id=cand.candidate_id, seed_ids=cand.seed_ids, metadata_id=cand.metadata_id,
        use_case=cand.use_case, skills=cand.skills, basic_instruction=cand.basic_instruction,
        actions_applied=cand.actions_applied, round=cand.round, strong_model=answer.model,
        target_model=settings.target.model, **dict.fromkeys(SCORE_COLUMNS, nan), gap=nan, decision="keep_strong")


@codec_task("filter", run_name="keep all r{round} · batch {batch}")
def keep_answered(candidates: Ref, responses: Ref, settings: StageSettings, round: int, batch: str) -> Outputs:
    """Every final candidate with a strong answer becomes a pair (Contrastive Filtering off)."""
    step = Step("filter", batch, settings, candidates=candidates["sha"], responses=responses["sha"], round=round,
                unfiltered=True)
    if (done := step.done()) is not None:
        return done
    answers = {r.candidate_id: r for r in read(responses, Response) if r.role == "strong"}
    kept = [unfiltered_pair(c, answers[c.candidate_id], settings) for c in read(candidates, Candidate)
            if c.candidate_id in answers]
    step.write("kept", kept, TrainingPair)
    step.write("decisions", [FilterDecision(candidate_id=p.candidate_id, instruction_id=p.instruction_id,
                                            round=round, gap=math.nan, decision="keep_strong") for p in kept],
               FilterDecision)
    return step.finish()


def training_pair(cand: Candidate, judgement: Judgement, answers: dict[str, Response], decision: Decision
                  ) -> TrainingPair:
    source, other = ("strong", "target") if decision == "keep_strong" else ("target", "strong")
    return TrainingPair(
        pair_id=content_id("pair", cand.candidate_id), instruction=cand.instruction,
        response=answers[source].text, response_source=source, other_response=answers[other].text,
        instruction_id=cand.instruction_id, candidate_id=cand.candidate_id, seed_ids=cand.seed_ids,
        metadata_id=cand.metadata_id, use_case=cand.use_case, skills=cand.skills,
        basic_instruction=cand.basic_instruction, actions_applied=cand.actions_applied, round=cand.round,
        strong_model=answers["strong"].model, target_model=answers["target"].model,
        **{column: getattr(judgement, column) for column in SCORE_COLUMNS}, gap=judgement.gap, decision=decision)


@codec_task("filter", run_name="{name} r{round} · batch {batch}")
def filter_candidates(candidates: Ref, responses: Ref, judgements: Ref, settings: StageSettings, round: int,
                      batch: str) -> Outputs:
    """Split judged candidates into kept pairs, candidates for the next round, and rejections."""
    step = Step("filter", batch, settings, candidates=candidates["sha"], responses=responses["sha"],
                judgements=judgements["sha"], round=round)
    if (done := step.done()) is not None:
        return done
    answers: dict[str, dict[str, Response]] = {}
    for r in read(responses, Response):
        answers.setdefault(r.candidate_id, {})[r.role] = r
    scored = {j.candidate_id: j for j in read(judgements, Judgement)}
    kept, pending, rejected, decisions = [], [], [], []
    for cand in read(candidates, Candidate):
        judgement = scored.get(cand.candidate_id)
        if judgement is None:
            continue  # a call for it failed upstream; its FailedCall row accounts for it
        decision = decide(judgement.gap, round, settings)
        decisions.append(FilterDecision(candidate_id=cand.candidate_id, instruction_id=cand.instruction_id,
                                        round=round, gap=judgement.gap, decision=decision))
        if decision in ("keep_strong", "keep_target"):
            kept.append(training_pair(cand, judgement, answers[cand.candidate_id], decision))
        elif decision == "next_round":
            pending.append(cand)
        else:
            rejected.append(RejectedCandidate(instruction_id=cand.instruction_id, candidate_id=cand.candidate_id,
                                              metadata_id=cand.metadata_id, round=round,
                                              instruction=cand.instruction,
                                              reason=reject_reason(judgement.gap, settings), gap=judgement.gap))
    step.write("kept", kept, TrainingPair)
    step.write("pending", pending, Candidate)
    step.write("rejected", rejected, RejectedCandidate)
    step.write("decisions", decisions, FilterDecision)
    return step.finish()
