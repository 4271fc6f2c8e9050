"""Evol-Instruct baseline (Xu et al. 2023; CodecLM §5.1, A.2: "WizardLM") and WizardLM+ (the same rounds from
CodecLM's basic instructions): every root (every seed, or every basic instruction) is evolved for `evol_rounds`
rounds; each round rewrites every instruction of the previous generation with one evolution method (five
in-depth, one in-breadth, drawn at random), and eliminates evolutions that failed.

Elimination (at this step; answers are checked in `tasks.pairs`): an evolution whose text equals its parent's
(case and spacing aside) is `unchanged`; one that talks about the rewriting itself ("given instruction",
"rewritten instruction", a leftover tag) is `prompt_leak`; one repeating an instruction already made, a root
or a seed is `duplicate`. An eliminated evolution has no children.

The pool is every surviving evolution of every round (generations 1..R; the roots themselves are not in it: they
are the seeds, not evolved data). Draw (stated): `tasks.pairs` answers the pool in a seeded uniform shuffle until
the budget is met, so the budget is a uniform sample of the pool, whose generations are about equally large.

Too few roots (stated): when roots x rounds cannot give `want` evolutions, each root starts `lineages` chains,
the smallest of 1..6 that can: its k lineages take k distinct methods in round 1 (distinct prompts, so distinct
calls) and then evolve once per round each, as WizardLM does, so every generation stays the same size. Six
lineages (every method once) is the most; a pool still short of the budget is a reported shortfall.
"""

from __future__ import annotations

import random
import re

from pydantic import BaseModel, Field

from codeclm.baseline_records import (
    BaselineRejected,
    BaselineRejectReason,
    PoolInstruction,
    lineages,
    seeds_needed,
)
from codeclm.llm.gateway import Call, Reply
from codeclm.llm.parsing import parse_improved_instruction
from codeclm.llm.prompts import load_prompt
from codeclm.records import Candidate, Seed, content_id
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read
from tasks.decode import normal_text

DEPTH = ("add_constraints", "deepen", "concretize", "increase_reasoning", "complicate_input")
BREADTH = "breadth"
METHODS = (*DEPTH, BREADTH)
_LEAK = re.compile(r"\b(given|rewritten|original|new) instruction\b|</?\s*instruction\s*>", re.IGNORECASE)


class Evolved(BaseModel):
    instruction: str = Field(min_length=1)


def _from_text(text: str) -> Evolved:
    return Evolved(instruction=parse_improved_instruction(text))


def pick_methods(instruction_id: str, round: int, fanout: int, settings: StageSettings) -> list[str]:
    """`fanout` distinct methods, drawn without replacement; in-breadth weighs `evol_breadth_weight`, each
    in-depth method 1 (so in-breadth is the rarer kind, as in WizardLM)."""
    rng = random.Random(f"{settings.seed}:evol:{instruction_id}:{round}")
    left = list(METHODS)
    weights = [1.0] * len(DEPTH) + [settings.baselines.evol_breadth_weight]
    chosen: list[str] = []
    while len(chosen) < fanout and left:
        if sum(weights) <= 0:  # in-breadth switched off and every in-depth method used
            break
        i = rng.choices(range(len(left)), weights=weights)[0]
        chosen.append(left.pop(i))
        weights.pop(i)
    return chosen


def eliminated(parent: str, child: str) -> BaselineRejectReason | None:
    """Why an evolution is dropped at once, or None (the stated rule in the module docstring)."""
    if normal_text(child) == normal_text(parent):
        return "unchanged"
    if _LEAK.search(child):
        return "prompt_leak"
    return None


def roots_of(seeds: list[Seed], basic: list[Candidate], method: str) -> list[PoolInstruction]:
    """Evol-Instruct evolves the seeds; WizardLM+ evolves CodecLM's basic instructions (round 1, with their
    metadata)."""
    if basic:
        return [PoolInstruction(instruction_id=c.instruction_id, instruction=c.instruction, method=method, round=0,
                                root_instruction=c.instruction, evolutions=[], seed_ids=c.seed_ids,
                                metadata_id=c.metadata_id, use_case=c.use_case, skills=c.skills)
                for c in sorted(basic, key=lambda c: c.instruction_id) if c.round == 1]
    return [PoolInstruction(instruction_id=content_id("root", s.seed_id, s.instruction), instruction=s.instruction,
                            method=method, round=0, root_instruction=s.instruction, evolutions=[],
                            seed_ids=[s.seed_id])
            for s in seeds]


@codec_task("basic", run_name="{name} · {method}")
def published_basic(candidates: Ref, settings: StageSettings, method: str) -> Outputs:
    """The basic (round-1) instructions of a published CodecLM dataset's candidates table, as WizardLM+'s roots:
    a seeded sample of as many as Evol-Instruct's recipe evolves (budget x evol_oversample / evol_rounds), since
    CodecLM oversamples its basic instructions; no call is made."""
    step = Step("basic", method, settings, candidates=candidates["sha"])
    if (done := step.done()) is not None:
        return done
    basic = sorted((c for c in read(candidates, Candidate) if c.round == 1), key=lambda c: c.instruction_id)
    need = seeds_needed("evol_instruct", settings) or len(basic)  # WizardLM's recipe: every root, 4 rounds
    if len(basic) > need:
        basic = random.Random(f"{settings.seed}:wizardlm_plus:basic").sample(basic, need)
    step.write("candidates", basic, Candidate)
    return step.finish()


@codec_task("evol", run_name="{name} · {method}", tags=["role:strong"])
def evol(seeds: list[Ref], basic: list[Ref], settings: StageSettings, want: int, method: str) -> Outputs:
    """Evolve every root for `evol_rounds` rounds; every surviving evolution of every round joins the pool."""
    step = Step("evol", method, settings, seeds=[s["sha"] for s in seeds], basic=[b["sha"] for b in basic],
                want=want)
    if (done := step.done()) is not None:
        return done
    seed_rows = [s for ref in seeds for s in read(ref, Seed)]
    roots = roots_of(seed_rows, [c for ref in basic for c in read(ref, Candidate)], method)
    rounds = settings.baselines.evol_rounds
    chains = lineages(len(roots), want, rounds)
    seen = {normal_text(t) for t in [*(s.instruction for s in seed_rows), *(r.instruction for r in roots)]}
    generation, pool = roots, []
    rejected: list[BaselineRejected] = []
    print(f"{method}: all {len(roots)} roots, {chains} lineage(s) each, {rounds} rounds")
    for round in range(1, rounds + 1):
        jobs = [(parent, m) for parent in generation
                for m in pick_methods(parent.instruction_id, round, chains if round == 1 else 1, settings)]
        calls = []
        for parent, m in jobs:
            prompt = load_prompt(f"evol_{m}")
            calls.append(Call(role="strong", messages=prompt.render(structured=False, instruction=parent.instruction),
                              output=Evolved, text_parser=_from_text, reply=Reply.FREE_TEXT,
                              prompt_version=prompt.version, stage="evol", item_id=f"{parent.instruction_id}>{m}"))
        generation = []
        for (parent, m), result in zip(jobs, step.call(calls), strict=True):
            if not result.ok:
                continue
            text = result.value.instruction.strip()
            instruction_id = content_id("evol", parent.instruction_id, m, text)
            reason = eliminated(parent.instruction, text)
            if reason is None and normal_text(text) in seen:
                reason = "duplicate"
            if reason is not None:
                rejected.append(BaselineRejected(instruction_id=instruction_id, instruction=text, stage="evol",
                                                 reason=reason, detail=m))
                continue
            seen.add(normal_text(text))
            generation.append(parent.model_copy(update={
                "instruction_id": instruction_id, "instruction": text, "round": round,
                "parent_id": parent.instruction_id, "evolutions": [*parent.evolutions, m]}))
        pool += generation
        if not generation:
            break
    step.write("instructions", pool, PoolInstruction)
    step.write("rejected", rejected, BaselineRejected)
    return step.finish()
