"""Self-Rubrics, part 1 (paper §4.2, Fig. 9): per metadata, rubrics of difficulty and matching actions."""

from __future__ import annotations

from pydantic import BaseModel, Field

from codeclm.llm.gateway import Call
from codeclm.llm.parsing import parse_rubrics_actions
from codeclm.llm.prompts import load_prompt
from codeclm.records import Metadata, RubricSet
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read


class RubricsAndActions(BaseModel):
    rubrics: list[str] = Field(min_length=1, max_length=20)
    actions: list[str] = Field(min_length=1, max_length=20)


@codec_task("rubrics", tags=["role:strong"])
def rubrics(metadata: Ref, settings: StageSettings, batch: str) -> Outputs:
    """One call per metadata for `n_rubrics` rubrics and actions tailored to its use case and skills."""
    step = Step("rubrics", batch, settings, metadata=metadata["sha"])
    if (done := step.done()) is not None:
        return done
    prompt = load_prompt("rubrics")
    structured = step.structured("strong")
    n = settings.n_rubrics

    def from_text(text: str) -> RubricsAndActions:
        found_rubrics, found_actions = parse_rubrics_actions(text, n)
        return RubricsAndActions(rubrics=found_rubrics, actions=found_actions)

    metas = read(metadata, Metadata)
    calls = [Call(role="strong", messages=prompt.render(structured=structured, n=n, use_case=m.use_case,
                                                        skills=", ".join(m.skills)),
                  output=RubricsAndActions, text_parser=from_text, prompt_version=prompt.version,
                  stage="rubrics", item_id=m.metadata_id) for m in metas]
    sets = [RubricSet(metadata_id=m.metadata_id, rubrics=r.value.rubrics[:n],
                      actions=[a.strip() for a in r.value.actions[:n] if a.strip()])
            for m, r in zip(metas, step.call(calls), strict=True) if r.ok]
    step.write("rubrics", [s for s in sets if s.actions], RubricSet)
    return step.finish()
