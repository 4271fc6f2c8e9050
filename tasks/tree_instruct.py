"""Tree-Instruct baseline (Zhao et al. 2023; CodecLM Table 1, A.2: 10 tree nodes, seeds sampled from Alpaca): one
strong-model call per seed instruction writes its semantic tree, adds `tree_nodes` nodes, and writes the new,
more complex instruction from the enlarged tree (`prompts/tree_instruct.md`).

Seeds (stated): the pool wants `want` instructions (the budget). The seeds are put in a seeded shuffle and
rewritten in that order, one rewrite each, so with more seeds than wanted a seeded sample of them is rewritten.
With fewer seeds, each seed is rewritten up to ceil(want / seeds) times: rewrite k of a seed (k >= 1) is a call
of its own (item id `<seed>#k`, and a prompt asking for a different enlargement, so it is not the cached first
call). A rewrite that fails or is eliminated (Evol-Instruct's rule: unchanged, prompt leak, duplicate) is
replaced by the next rewrite in that order, in waves, until `want` instructions exist or the order is used up;
then the flow reports a shortfall.
"""

from __future__ import annotations

import math
import random
import re

from pydantic import BaseModel, Field

from codeclm.baseline_records import BaselineRejected, PoolInstruction
from codeclm.errors import ParseError
from codeclm.llm.gateway import Call, Reply
from codeclm.llm.prompts import load_prompt
from codeclm.records import Seed, content_id
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read
from tasks.decode import normal_text
from tasks.evol import eliminated

METHOD = "tree_instruct"
_NEW = re.compile(r"^[\W_]*new instruction[\W_]*?:?[*#\s]*", re.IGNORECASE | re.MULTILINE)
_VARIATION = ("This is rewrite {k} of this instruction: choose other nodes to add than an obvious first choice, so "
              "that it differs from the other rewrites.")


class TreeInstruction(BaseModel):
    instruction: str = Field(min_length=1)


def parse_tree_output(text: str) -> TreeInstruction:
    """What follows the last 'New instruction:' heading ('**New instruction:**', '### New Instruction' too)."""
    found = list(_NEW.finditer(text))
    if not found:
        raise ParseError("no 'New instruction:' section")
    body = text[found[-1].end():].strip().strip("*").strip().strip('"').strip()
    if not body:
        raise ParseError("empty new instruction")
    return TreeInstruction(instruction=body)


def rewrite_order(seeds: list[Seed], want: int, settings: StageSettings) -> list[tuple[Seed, int]]:
    """(seed, rewrite number) in the order they are made: a seeded shuffle of the seeds, first rewrites of all
    of them, then second ones, ..., each seed at most ceil(want / seeds) times."""
    ordered = sorted(seeds, key=lambda s: s.seed_id)
    random.Random(f"{settings.seed}:tree_instruct").shuffle(ordered)
    per_seed = max(1, math.ceil(want / max(len(ordered), 1)))
    return [(seed, k) for k in range(per_seed) for seed in ordered]


def tree_call(seed: Seed, k: int, settings: StageSettings) -> Call:
    prompt = load_prompt("tree_instruct")
    variation = _VARIATION.format(k=k + 1) if k else ""
    return Call(role="strong", messages=prompt.render(structured=False, instruction=seed.instruction,
                                                      nodes=settings.baselines.tree_nodes, variation=variation),
                output=TreeInstruction, text_parser=parse_tree_output, reply=Reply.FREE_TEXT,
                prompt_version=prompt.version, stage="tree_instruct", item_id=f"{seed.seed_id}#{k}")


@codec_task("tree_instruct", run_name="{name} · {want} instructions", tags=["role:strong"])
def tree_instruct(seeds: list[Ref], settings: StageSettings, want: int) -> Outputs:
    """Rewrite seeds in `rewrite_order`, in waves of the instructions still missing, until `want` exist."""
    step = Step("tree_instruct", METHOD, settings, seeds=[s["sha"] for s in seeds], want=want)
    if (done := step.done()) is not None:
        return done
    seed_rows = [s for ref in seeds for s in read(ref, Seed)]
    order = rewrite_order(seed_rows, want, settings)
    seen = {normal_text(s.instruction) for s in seed_rows}
    pool: list[PoolInstruction] = []
    rejected: list[BaselineRejected] = []
    start = 0
    print(f"{METHOD}: {len(seed_rows)} seeds, {want} instructions wanted, {settings.baselines.tree_nodes} nodes added")
    while len(pool) < want and start < len(order):
        wave = order[start:start + want - len(pool)]
        start += len(wave)
        results = step.call([tree_call(seed, k, settings) for seed, k in wave])
        for (seed, k), result in zip(wave, results, strict=True):
            if not result.ok:
                continue
            text = result.value.instruction.strip()
            instruction_id = content_id("tree", seed.seed_id, k, text)
            reason = eliminated(seed.instruction, text)
            if reason is None and normal_text(text) in seen:
                reason = "duplicate"
            if reason is not None:
                rejected.append(BaselineRejected(instruction_id=instruction_id, instruction=text,
                                                 stage="tree_instruct", reason=reason, detail=f"rewrite {k + 1}"))
                continue
            seen.add(normal_text(text))
            pool.append(PoolInstruction(
                instruction_id=instruction_id, instruction=text, method=METHOD, round=1,
                parent_id=content_id("root", seed.seed_id, seed.instruction), root_instruction=seed.instruction,
                evolutions=[f"tree+{settings.baselines.tree_nodes}"], seed_ids=[seed.seed_id]))
    step.write("instructions", pool, PoolInstruction)
    step.write("rejected", rejected, BaselineRejected)
    return step.finish()
