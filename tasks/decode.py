"""Decode (paper §4.1, Fig. 8): each metadata becomes N basic instructions, the candidates of round 1."""

from __future__ import annotations

from pydantic import BaseModel, Field

from codeclm.errors import ParseError
from codeclm.gateway import Call
from codeclm.parsing import parse_improved_instruction, parse_numbered_list
from codeclm.prompts import load_prompt
from codeclm.records import Candidate, Metadata, RejectedCandidate, Seed, content_id
from codeclm.settings import Settings
from tasks._base import Outputs, Ref, Step, codec_task, read


class Instructions(BaseModel):
    instructions: list[str] = Field(min_length=1, max_length=50)


def _from_text(text: str) -> Instructions:
    return Instructions(instructions=parse_numbered_list(text))


def _one_from_text(text: str) -> Instructions:
    """Asked for one instruction, a model may answer with just that instruction, without a list."""
    try:
        return _from_text(text)
    except ParseError:
        return Instructions(instructions=[parse_improved_instruction(text)])


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


@codec_task("decode", tags=["role:strong"])
def decode(metadata: Ref, seeds: list[Ref], settings: Settings, per_metadata: int, batch: str) -> Outputs:
    """Ask for `per_metadata` diverse instructions per metadata; drop copies of seeds and repeats."""
    step = Step("decode", batch, settings, metadata=metadata["sha"], seeds=[s["sha"] for s in seeds], n=per_metadata)
    if (done := step.done()) is not None:
        return done
    prompt = load_prompt("decode")
    single = per_metadata == 1  # one free-text answer needs no schema (and no slow grammar on llama.cpp)
    structured = step.structured("strong") and not single
    metas = read(metadata, Metadata)
    calls = [Call(role="strong", messages=prompt.render(structured, n=per_metadata, use_case=m.use_case,
                                                        skills=", ".join(m.skills)),
                  output=Instructions, text_parser=_one_from_text if single else _from_text, free_text=single,
                  prompt_version=prompt.version, stage="decode", item_id=m.metadata_id) for m in metas]
    seed_texts = {_normal(s.instruction) for ref in seeds for s in read(ref, Seed)}
    candidates: list[Candidate] = []
    rejected: list[RejectedCandidate] = []
    seen: set[str] = set()
    for meta, result in zip(metas, step.call(calls), strict=True):
        if not result.ok:
            continue
        for index, text in enumerate(result.value.instructions[:per_metadata]):
            text = text.strip()
            if not text:
                continue
            instruction_id = content_id("inst", meta.metadata_id, index, text)
            cand = Candidate(candidate_id=content_id("cand", instruction_id, 1, text), instruction_id=instruction_id,
                             metadata_id=meta.metadata_id, seed_ids=meta.seed_ids, use_case=meta.use_case,
                             skills=meta.skills, round=1, instruction=text, basic_instruction=text,
                             actions_applied=[])
            reason = ("seed_overlap" if settings.drop_seed_overlap and _normal(text) in seed_texts
                      else "duplicate" if _normal(text) in seen else None)
            seen.add(_normal(text))
            if reason:
                rejected.append(RejectedCandidate(instruction_id=instruction_id, candidate_id=cand.candidate_id,
                                                  metadata_id=meta.metadata_id, round=1, instruction=text,
                                                  reason=reason))
            else:
                candidates.append(cand)
    step.write("candidates", candidates, Candidate)
    step.write("rejected", rejected, RejectedCandidate)
    return step.finish()
