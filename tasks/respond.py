"""Contrastive Filtering, part 1 (paper §4.3): the strong and the target model both answer each candidate."""

from __future__ import annotations

from codeclm.llm.gateway import Call, Reply
from codeclm.llm.prompts import load_prompt
from codeclm.records import Candidate, Response
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read

ROLES = ("strong", "target")


def answer_messages(instruction: str) -> list[dict[str, str]]:
    """The chat messages a model answers an instruction under (system prompt included); train.jsonl is built
    from the same messages, so the data trains on exactly what was answered."""
    return load_prompt("respond").render(structured=False, instruction=instruction)


def answer_calls(prompts: list[tuple[str, str]], role: str, stage: str) -> list[Call]:
    """Plain chat calls answering (item id, prompt) pairs, at the role's own temperature and max_tokens; shared
    with the evaluation flow so its answers hit the same cache entries when the prompt is the same."""
    version = load_prompt("respond").version
    return [Call(role=role, messages=answer_messages(text), output=None, reply=Reply.TEXT,
                 prompt_version=version, stage=stage, item_id=item_id)
            for item_id, text in prompts]


@codec_task("respond", run_name="{name} r{round} · batch {batch}", tags=["role:strong", "role:target"])
def respond(candidates: Ref, settings: StageSettings, round: int, batch: str, roles: tuple[str, ...] = ROLES
            ) -> Outputs:
    """Both answers for every candidate (only the strong one without Contrastive Filtering, where the target's
    would be wasted calls); a candidate whose answer failed fails as a whole."""
    key = {} if roles == ROLES else {"roles": list(roles)}
    step = Step("respond", batch, settings, candidates=candidates["sha"], round=round, **key)
    if (done := step.done()) is not None:
        return done
    cands = read(candidates, Candidate)
    lineage = {c.candidate_id: c.instruction_id for c in cands}
    items = [(c.candidate_id, c.instruction) for c in cands]
    calls = [call for role in roles for call in answer_calls(items, role, "respond")]
    responses = [Response(candidate_id=r.call.item_id, role=r.call.role, model=r.model, text=r.value)
                 for r in step.call(calls, lineage) if r.ok]
    step.write("responses", responses, Response)
    return step.finish()
