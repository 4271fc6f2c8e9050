"""Self-Rubrics, part 2 (paper §4.2, Fig. 10): rewrite an instruction harder with one sampled action."""

from __future__ import annotations

import random

from pydantic import BaseModel, Field

from codeclm.llm.gateway import Call, Reply
from codeclm.llm.parsing import parse_improved_instruction
from codeclm.llm.prompts import Prompt, load_prompt
from codeclm.records import Candidate, RubricSet, content_id
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read


class Improved(BaseModel):
    improved_instruction: str = Field(min_length=1)


def _from_text(text: str) -> Improved:
    return Improved(improved_instruction=parse_improved_instruction(text))


def pick_action(candidate: Candidate, actions: list[str], round: int, settings: StageSettings) -> str:
    """One random action per round, reproducible from the seed; without replacement unless configured."""
    rng = random.Random(f"{settings.seed}:{candidate.instruction_id}:{round}")
    fresh = [a for a in actions if a not in candidate.actions_applied]
    pool = fresh if settings.action_sampling == "without_replacement" and fresh else actions
    return rng.choice(pool)


def improve_call(cand: Candidate, action: str, prompt: Prompt) -> Call:
    """The call rewriting one candidate with one action (a free-text answer)."""
    return Call(role="strong", messages=prompt.render(structured=False, action=action, instruction=cand.instruction),
                output=Improved, text_parser=_from_text, reply=Reply.FREE_TEXT, prompt_version=prompt.version,
                stage="improve", item_id=cand.candidate_id)


def improved_candidate(cand: Candidate, action: str, answer: Improved, round: int) -> Candidate:
    """The round-`round` candidate made from the rewritten instruction."""
    text = answer.improved_instruction.strip()
    return cand.model_copy(update={
        "candidate_id": content_id("cand", cand.instruction_id, round, text), "round": round,
        "instruction": text, "actions_applied": [*cand.actions_applied, action]})


@codec_task("improve", run_name="{name} r{round} · batch {batch}", tags=["role:strong"])
def improve(pending: Ref, rubric_sets: Ref, settings: StageSettings, round: int, batch: str) -> Outputs:
    """Make round `round` candidates from the ones Contrastive Filtering sent back."""
    step = Step("improve", batch, settings, pending=pending["sha"], rubrics=rubric_sets["sha"], round=round)
    if (done := step.done()) is not None:
        return done
    prompt = load_prompt("improve")
    actions = {r.metadata_id: r.actions for r in read(rubric_sets, RubricSet)}
    todo: list[tuple[Candidate, str]] = []
    for cand in read(pending, Candidate):
        if cand.metadata_id in actions:
            todo.append((cand, pick_action(cand, actions[cand.metadata_id], round, settings)))
        else:
            step.fail(cand.candidate_id, "strong", "", "MissingRubrics", "no actions for this metadata: the rubrics "
                      "call failed", instruction_id=cand.instruction_id)
    calls = [improve_call(cand, action, prompt) for cand, action in todo]
    results = step.call(calls, {c.candidate_id: c.instruction_id for c, _ in todo})
    improved = [improved_candidate(cand, action, result.value, round)
                for (cand, action), result in zip(todo, results, strict=True) if result.ok]
    step.write("candidates", improved, Candidate)
    return step.finish()
