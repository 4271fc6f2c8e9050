"""Duplicate removal across the whole run: a basic instruction repeating an earlier one, in any batch, ends here.

Decode runs per batch in parallel, so repeats between batches only show when all batches are seen. Each batch
task reads the batches before it, so the first occurrence (batch order, then decode order) is the one kept, and
the result does not depend on which batch finished first. The paper describes no duplicate removal; the setting
`drop_duplicates` turns it off (the `paper` preset does).
"""

from __future__ import annotations

from codeclm.records import Candidate, RejectedCandidate
from codeclm.settings import Settings
from tasks._base import Outputs, Ref, Step, codec_task, read
from tasks.decode import normal_text


@codec_task("dedup")
def dedup(candidates: Ref, earlier: list[Ref], settings: Settings, batch: str) -> Outputs:
    """This batch's round-1 candidates without those whose text came earlier in it or in an earlier batch."""
    step = Step("dedup", batch, settings, candidates=candidates["sha"], earlier=[r["sha"] for r in earlier])
    if (done := step.done()) is not None:
        return done
    seen = {normal_text(c.instruction) for ref in earlier for c in read(ref, Candidate)}
    kept: list[Candidate] = []
    rejected: list[RejectedCandidate] = []
    for cand in read(candidates, Candidate):
        text = normal_text(cand.instruction)
        if text in seen:
            rejected.append(RejectedCandidate(instruction_id=cand.instruction_id, candidate_id=cand.candidate_id,
                                              metadata_id=cand.metadata_id, round=cand.round,
                                              instruction=cand.instruction, reason="duplicate"))
        else:
            kept.append(cand)
            seen.add(text)
    step.write("candidates", kept, Candidate)
    step.write("rejected", rejected, RejectedCandidate)
    return step.finish()
