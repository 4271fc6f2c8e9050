"""Encode (paper §4.1, Fig. 7): each seed instruction becomes metadata, a use case and at most `max_skills` skills."""

from __future__ import annotations

from pydantic import BaseModel, Field

from codeclm.llm.gateway import Call
from codeclm.llm.parsing import parse_metadata
from codeclm.llm.prompts import load_prompt
from codeclm.records import Metadata, Seed, content_id
from codeclm.settings import MAX_SKILLS, StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read


class EncodedMetadata(BaseModel):
    """What the strong model returns for one seed."""

    use_case: str = Field(min_length=1, max_length=200)
    skills: list[str] = Field(min_length=1, max_length=MAX_SKILLS)


def _from_text(text: str) -> EncodedMetadata:
    use_case, skills = parse_metadata(text)
    return EncodedMetadata(use_case=use_case, skills=skills[:MAX_SKILLS])  # then to `max_skills`


def metadata_of(use_case: str, skills: list[str], origin: str, seed_ids: list[str]) -> Metadata:
    """Metadata with an id from its content, so equal (use case, skills) pairs merge across seeds."""
    use_case = use_case.strip().rstrip(".").lower()
    skills = sorted({s.strip().rstrip(".").lower() for s in skills if s.strip()})
    return Metadata(metadata_id=content_id("meta", use_case, *skills), use_case=use_case, skills=skills,
                    origin=origin, seed_ids=seed_ids)


@codec_task("encode", tags=["role:strong"])
def encode(seeds: Ref, settings: StageSettings, batch: str) -> Outputs:
    """Ask the strong model for the use case and skills of every seed in the batch."""
    step = Step("encode", batch, settings, seeds=seeds["sha"])
    if (done := step.done()) is not None:
        return done
    prompt = load_prompt("encode")
    structured = step.structured("strong")
    rows = read(seeds, Seed)
    calls = [Call(role="strong", messages=prompt.render(structured=structured, instruction=s.instruction,
                                                        max_skills=settings.max_skills),
                  output=EncodedMetadata, text_parser=_from_text, prompt_version=prompt.version,
                  stage="encode", item_id=s.seed_id) for s in rows]
    metadata = [metadata_of(r.value.use_case, r.value.skills[: settings.max_skills], "seed", [s.seed_id])
                for s, r in zip(rows, step.call(calls), strict=True) if r.ok]
    step.write("metadata", metadata, Metadata)
    return step.finish()

