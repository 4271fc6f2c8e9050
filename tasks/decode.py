"""Decode (paper §4.1, Fig. 8): each metadata becomes N basic instructions, the candidates of round 1."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from codeclm.errors import ParseError
from codeclm.llm.gateway import Call, Reply
from codeclm.llm.parsing import parse_improved_instruction, parse_numbered_list
from codeclm.llm.prompts import load_prompt
from codeclm.records import Candidate, Metadata, RejectedCandidate, Seed, content_id
from codeclm.settings import DECODE_MAX_PER_CALL, StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read


class Instructions(BaseModel):
    instructions: list[str] = Field(min_length=1, max_length=DECODE_MAX_PER_CALL)


def _from_text(text: str) -> Instructions:
    return Instructions(instructions=parse_numbered_list(text)[:DECODE_MAX_PER_CALL])


def _one_from_text(text: str) -> Instructions:
    """Asked for one instruction, a model may answer with just that instruction, without a list."""
    try:
        return _from_text(text)
    except ParseError:
        return Instructions(instructions=[parse_improved_instruction(text)])


def normal_text(text: str) -> str:
    """The form two instructions are compared in: case and whitespace do not make them different."""
    return " ".join(text.lower().split())


def call_sizes(n: int) -> list[int]:
    """`n` instructions as the fewest calls the schema allows, split evenly: 120 -> [40, 40, 40]."""
    parts = math.ceil(n / DECODE_MAX_PER_CALL)
    return [n // parts + (i < n % parts) for i in range(parts)]


def _calls(metas: list[Metadata], made: dict[str, list[str]], size: int, part: int, structured: bool,
           topup: int = 0) -> list[Call]:
    """One call per metadata for `size` instructions; after the first part (and in every top-up pass), the prompt
    lists what earlier parts and passes wrote (and its different text keeps the calls apart in the cache)."""
    single = size == 1  # one free-text answer needs no schema (and no slow grammar on llama.cpp)
    prompt = load_prompt("decode" if part == 0 and not topup else "decode_more")
    suffix = f"#t{topup}.{part + 1}" if topup else f"#{part + 1}"
    calls = []
    for m in metas:
        written = "\n".join(f"{i}. {text}" for i, text in enumerate(made[m.metadata_id], start=1))
        messages = prompt.render(structured=structured and not single, n=size, use_case=m.use_case,
                                 skills=", ".join(m.skills), written=written)
        calls.append(Call(role="strong", messages=messages, output=Instructions,
                          text_parser=_one_from_text if single else _from_text,
                          reply=Reply.FREE_TEXT if single else Reply.STRUCTURED,
                          prompt_version=prompt.version, stage="decode",
                          item_id=m.metadata_id if part == 0 and not topup else f"{m.metadata_id}{suffix}"))
    return calls


@codec_task("decode", tags=["role:strong"])
def decode(metadata: Ref, seeds: list[Ref], settings: StageSettings, per_metadata: int, batch: str,
           earlier: list[Ref] | None = None, topup: int = 0) -> Outputs:
    """Ask for `per_metadata` diverse instructions per metadata (over several calls when the schema's cap needs
    it); drop copies of seeds. Repeats across the whole run are the `dedup` step's job. A top-up pass (`topup` >
    0) asks for `per_metadata` more, showing the model what the `earlier` passes' candidates already say."""
    more = {"earlier": [r["sha"] for r in earlier or []], "topup": topup} if topup else {}
    step = Step("decode", batch, settings, metadata=metadata["sha"], seeds=[s["sha"] for s in seeds], n=per_metadata,
                **more)
    if (done := step.done()) is not None:
        return done
    structured = step.structured("strong")
    metas = read(metadata, Metadata)
    made: dict[str, list[str]] = {m.metadata_id: [] for m in metas}
    for ref in earlier or []:
        for cand in read(ref, Candidate):
            if cand.metadata_id in made:
                made[cand.metadata_id].append(cand.instruction)
    before = {m: len(texts) for m, texts in made.items()}
    for part, size in enumerate(call_sizes(per_metadata)):
        for meta, result in zip(metas, step.call(_calls(metas, made, size, part, structured, topup)), strict=True):
            if result.ok:
                made[meta.metadata_id] += [t.strip() for t in result.value.instructions[:size] if t.strip()]
    seed_texts = {normal_text(s.instruction) for ref in seeds for s in read(ref, Seed)}
    candidates: list[Candidate] = []
    rejected: list[RejectedCandidate] = []
    for meta in metas:
        for index, text in enumerate(made[meta.metadata_id]):
            if index < before[meta.metadata_id]:
                continue  # an earlier pass's candidate: not made here
            instruction_id = content_id("inst", meta.metadata_id, index, text)
            cand = Candidate(candidate_id=content_id("cand", instruction_id, 1, text), instruction_id=instruction_id,
                             metadata_id=meta.metadata_id, seed_ids=meta.seed_ids, use_case=meta.use_case,
                             skills=meta.skills, round=1, instruction=text, basic_instruction=text,
                             actions_applied=[])
            if settings.drop_seed_overlap and normal_text(text) in seed_texts:
                rejected.append(RejectedCandidate(instruction_id=instruction_id, candidate_id=cand.candidate_id,
                                                  metadata_id=meta.metadata_id, round=1, instruction=text,
                                                  reason="seed_overlap"))
            else:
                candidates.append(cand)
    step.write("candidates", candidates, Candidate)
    step.write("rejected", rejected, RejectedCandidate)
    return step.finish()
