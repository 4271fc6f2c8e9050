"""Self-Rubrics rounds with Contrastive Filtering for one batch (paper §4.2-4.3), without stage barriers.

Each instruction moves to its next call as soon as its previous one is answered: respond (strong and target) ->
score (both orders) -> filter -> improve -> respond ..., so a slow or hung call delays only its own instruction,
not the batch's whole stage. The tables are then written round by round by the step functions themselves
(respond, score, filter, improve), whose calls were all begun already and are answered from the gateway's
results: the same rows, lineage, failed calls and call stats as when each stage ran over the whole batch.
"""

from __future__ import annotations

import asyncio

from codeclm.llm.gateway import Call, Gateway, Result, gateway_for
from codeclm.llm.prompts import load_prompt
from codeclm.records import Candidate, RubricSet
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, codec_task, read
from tasks.filter import decide, filter_candidates, keep_answered
from tasks.improve import improve, improve_call, improved_candidate, pick_action
from tasks.respond import ROLES, answer_calls, respond
from tasks.score import judgement_of, score, score_calls


def stage_key(stage: str, round: int) -> str:
    """How a round's stage is named in outputs, progress and the UI: 'respond r1'."""
    return f"{stage} r{round}"


class _Chains:
    """Every candidate's chain of calls through the rounds, started at once on the gateway's loop."""

    def __init__(self, gateway: Gateway, settings: StageSettings, actions: dict[str, list[str]]) -> None:
        self.gateway, self.settings, self.actions = gateway, settings, actions
        self.structured = gateway.endpoint(settings.scorer).output_mode != "text"
        self.improve_prompt = load_prompt("improve")
        self.begun: list[Call] = []

    async def _ask(self, calls: list[Call]) -> list[Result]:
        self.begun.extend(calls)
        return list(await asyncio.gather(*(self.gateway.submit(c) for c in calls)))

    async def unfiltered(self, cand: Candidate) -> None:
        """Contrastive Filtering off: improve through every round, then the strong model answers the last one."""
        while cand.round < self.settings.max_rounds:
            actions = self.actions.get(cand.metadata_id)
            if not actions:
                return
            action = pick_action(cand, actions, cand.round + 1, self.settings)
            (rewritten,) = await self._ask([improve_call(cand, action, self.improve_prompt)])
            if not rewritten.ok:
                return
            cand = improved_candidate(cand, action, rewritten.value, cand.round + 1)
        await self._ask(answer_calls([(cand.candidate_id, cand.instruction)], "strong", "respond"))

    async def chain(self, cand: Candidate) -> None:
        """One instruction through its rounds, stopping where a call fails or filtering decides."""
        if not self.settings.contrastive_filtering:
            return await self.unfiltered(cand)
        round = cand.round
        while True:
            answers = await self._ask([answer_calls([(cand.candidate_id, cand.instruction)], role, "respond")[0]
                                       for role in ROLES])
            if not all(a.ok for a in answers):
                return
            text = {a.call.role: a.value for a in answers}
            strong_first, target_first = await self._ask(score_calls(cand, text["strong"], text["target"],
                                                                     self.settings, self.structured))
            if not (strong_first.ok and target_first.ok):
                return
            judged = judgement_of(cand, strong_first.value, target_first.value)
            if decide(judged.gap, round, self.settings) != "next_round":
                return
            round += 1
            actions = self.actions.get(cand.metadata_id)
            if not actions:
                return
            action = pick_action(cand, actions, round, self.settings)
            (rewritten,) = await self._ask([improve_call(cand, action, self.improve_prompt)])
            if not rewritten.ok:
                return
            cand = improved_candidate(cand, action, rewritten.value, round)

    async def run(self, cands: list[Candidate]) -> None:
        """All chains at once; an error that dooms the run (ModelError) stops the others and is raised."""
        chains = [asyncio.ensure_future(self.chain(c)) for c in cands]
        try:
            await asyncio.gather(*chains)
        finally:
            for task in chains:
                task.cancel()


@codec_task("rounds", run_name="rounds · batch {batch}", tags=["role:strong", "role:target"])
def rounds(candidates: Ref, rubric_sets: Ref, settings: StageSettings, batch: str) -> dict[str, Outputs]:
    """Every Self-Rubrics round of one batch; the outputs of each step and round, keyed like 'respond r1'."""
    gateway = gateway_for(settings)
    actions = {r.metadata_id: r.actions for r in read(rubric_sets, RubricSet)}
    chains = _Chains(gateway, settings, actions)
    try:
        if candidates["rows"]:
            gateway.drive(chains.run(read(candidates, Candidate)))
        return record(candidates, rubric_sets, settings, batch)
    finally:
        gateway.forget(chains.begun)


def record(candidates: Ref, rubric_sets: Ref, settings: StageSettings, batch: str) -> dict[str, Outputs]:
    """Write every round's tables with the step functions, exactly as the stage-by-stage flow did."""
    if not settings.contrastive_filtering:
        return record_unfiltered(candidates, rubric_sets, settings, batch)
    outputs: dict[str, Outputs] = {}
    cands = candidates
    for round in range(1, settings.max_rounds + 1):
        if cands["rows"] == 0:
            break
        if round > 1:
            outputs[stage_key("improve", round)] = improve.fn(cands, rubric_sets, settings, round, batch)
            cands = outputs[stage_key("improve", round)]["candidates"]
        answered = outputs[stage_key("respond", round)] = respond.fn(cands, settings, round, batch)
        judged = outputs[stage_key("score", round)] = score.fn(cands, answered["responses"], settings, round, batch)
        filtered = outputs[stage_key("filter", round)] = filter_candidates.fn(
            cands, answered["responses"], judged["judgements"], settings, round, batch)
        cands = filtered["pending"]
    return outputs


def record_unfiltered(candidates: Ref, rubric_sets: Ref, settings: StageSettings, batch: str) -> dict[str, Outputs]:
    """Table 3's ablations: `improve` every candidate in rounds 2..K (Self-Rubrics without filtering in between;
    K = 1 is "metadata only"), then the strong answer to the last round's instruction is the pair."""
    outputs: dict[str, Outputs] = {}
    cands = candidates
    last = settings.max_rounds
    for round in range(2, last + 1):
        if cands["rows"] == 0:
            break
        outputs[stage_key("improve", round)] = improve.fn(cands, rubric_sets, settings, round, batch)
        cands = outputs[stage_key("improve", round)]["candidates"]
    if cands["rows"]:
        answered = outputs[stage_key("respond", last)] = respond.fn(cands, settings, last, batch, ("strong",))
        outputs[stage_key("filter", last)] = keep_answered.fn(cands, answered["responses"], settings, last, batch)
    return outputs


def ordered(per_batch: dict[str, dict[str, Outputs]], max_rounds: int) -> list[tuple[str, list[Outputs]]]:
    """Outputs grouped by step and round in the order the stage-by-stage flow collected them (round by round:
    improve, respond, score, filter; batches in order), so the published tables keep their row order."""
    groups: list[tuple[str, list[Outputs]]] = []
    for round in range(1, max_rounds + 1):
        for stage in ("improve", "respond", "score", "filter"):
            key = stage_key(stage, round)
            found = [outs[key] for outs in per_batch.values() if key in outs]
            if found:
                groups.append((key, found))
    return groups

