"""Self-Instruct baseline (Wang et al. 2022; CodecLM §5.1): bootstrap instructions from the seeds, each call
shown a few pool instructions (seeds first, then generated ones), keeping only those whose ROUGE-L F with
every pool instruction stays below the threshold, until `want` instructions are in the pool.

Rounds are reproducible from the settings' seed, and `want` only decides when to stop, so a larger `want`
replays the earlier rounds from the call cache and pays only for the rounds after them.
"""

from __future__ import annotations

import random

from codeclm.baseline_records import BaselineRejected, PoolInstruction
from codeclm.llm.gateway import Call
from codeclm.llm.parsing import parse_numbered_list
from codeclm.llm.prompts import load_prompt
from codeclm.records import Seed, content_id
from codeclm.rouge import RougePool
from codeclm.settings import DECODE_MAX_PER_CALL, StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read
from tasks.decode import Instructions


def _from_text(text: str) -> Instructions:
    return Instructions(instructions=parse_numbered_list(text)[:DECODE_MAX_PER_CALL])


def demos(seeds: list[Seed], generated: list[PoolInstruction], settings: StageSettings, round: int, index: int
          ) -> tuple[list[Seed], list[PoolInstruction]]:
    """The pool instructions one call is shown: a sample of seeds, then a sample of generated ones."""
    rng = random.Random(f"{settings.seed}:self_instruct:{round}:{index}")
    cfg = settings.baselines
    return (rng.sample(seeds, min(cfg.seed_demos, len(seeds))),
            rng.sample(generated, min(cfg.generated_demos, len(generated))))


def prompt_call(shown: list[str], settings: StageSettings, structured: bool, item_id: str) -> Call:
    prompt = load_prompt("self_instruct")
    n = settings.baselines.new_per_call
    examples = "\n".join(f"{i}. {text}" for i, text in enumerate(shown, start=1))
    return Call(role="strong", messages=prompt.render(structured=structured, k=len(shown), n=n, examples=examples),
                output=Instructions, text_parser=_from_text, prompt_version=prompt.version, stage="self_instruct",
                item_id=item_id)


@codec_task("self_instruct", run_name="{name} · {want} instructions", tags=["role:strong"])
def self_instruct(seeds: list[Ref], settings: StageSettings, want: int) -> Outputs:
    """Bootstrap until `want` instructions pass the ROUGE-L filter or `max_generation_calls` is reached."""
    step = Step("self_instruct", "all", settings, seeds=[s["sha"] for s in seeds], want=want)
    if (done := step.done()) is not None:
        return done
    cfg = settings.baselines
    structured = step.structured("strong")
    seed_rows = [s for ref in seeds for s in read(ref, Seed)]
    pool = RougePool(cfg.rouge_threshold)
    for s in seed_rows:
        pool.add(s.instruction)
    generated: list[PoolInstruction] = []
    rejected: list[BaselineRejected] = []
    round, calls_made = 0, 0
    while len(generated) < want and calls_made < cfg.max_generation_calls:
        round += 1
        shown = [demos(seed_rows, generated, settings, round, i)
                 for i in range(min(cfg.calls_per_round, cfg.max_generation_calls - calls_made))]
        calls = [prompt_call([s.instruction for s in picked_seeds] + [g.instruction for g in picked_generated],
                             settings, structured, f"r{round}c{i}")
                 for i, (picked_seeds, picked_generated) in enumerate(shown)]
        calls_made += len(calls)
        for (picked_seeds, _), result in zip(shown, step.call(calls), strict=True):
            if not result.ok:
                continue
            for text in (t.strip() for t in result.value.instructions[:cfg.new_per_call]):
                if len(generated) == want:
                    break
                instruction_id = content_id("si", round, text)
                ok, score = pool.accepts(text)
                if not ok:
                    reason = "rouge_overlap" if text else "empty"
                    rejected.append(BaselineRejected(instruction_id=instruction_id, instruction=text,
                                                     stage="self_instruct", reason=reason, detail=f"{score:.3f}"))
                    continue
                pool.add(text)
                generated.append(PoolInstruction(instruction_id=instruction_id, instruction=text,
                                                 method="self_instruct", round=round, root_instruction=text,
                                                 evolutions=[], seed_ids=[s.seed_id for s in picked_seeds]))
    step.write("instructions", generated, PoolInstruction)
    step.write("rejected", rejected, BaselineRejected)
    return step.finish()
