"""Duplicate removal across the whole run: a basic instruction repeating an earlier one, in any batch, ends here.

Decode runs per batch in parallel, so repeats between batches only show once every batch is decoded. One task
reads the batches in order, so the first occurrence (batch order, then decode order) is the one kept whichever
batch finished first; it makes no calls, so one task run for the whole run keeps the task count low. The paper
describes no duplicate removal; the setting `drop_duplicates` turns it off (the `paper` preset does).
"""

from __future__ import annotations

import hashlib
import json

from codeclm.records import Candidate, RejectedCandidate
from codeclm.settings import StageSettings
from codeclm.storage import write_records
from tasks._base import Ref, codec_task, read, ref_to
from tasks.decode import normal_text


def drop_repeats(batches: list[list[Candidate]]) -> tuple[list[list[Candidate]], list[RejectedCandidate]]:
    """Each batch without the candidates whose text came earlier in it or in an earlier batch."""
    seen: set[str] = set()
    kept: list[list[Candidate]] = []
    rejected: list[RejectedCandidate] = []
    for batch in batches:
        kept.append([])
        for cand in batch:
            text = normal_text(cand.instruction)
            if text in seen:
                rejected.append(RejectedCandidate(instruction_id=cand.instruction_id, candidate_id=cand.candidate_id,
                                                  metadata_id=cand.metadata_id, round=cand.round,
                                                  instruction=cand.instruction, reason="duplicate"))
            else:
                kept[-1].append(cand)
                seen.add(text)
    return kept, rejected


@codec_task("dedup", run_name="drop duplicates · {n_batches} batches")
def dedup(candidates: list[Ref], settings: StageSettings, n_batches: int) -> dict[str, list[Ref]]:
    """Round-1 candidates of every batch in, the same batches without repeats and one file of rejections out."""
    kept, rejected = drop_repeats([read(ref, Candidate) for ref in candidates])
    digest = hashlib.sha256(json.dumps([r["sha"] for r in candidates]).encode()).hexdigest()[:20]
    out = settings.work_dir / "dedup" / digest
    return {"candidates": [ref_to(write_records(out / f"candidates-{i:04d}.parquet", rows, Candidate))
                           for i, rows in enumerate(kept)],
            "rejected": [ref_to(write_records(out / "rejected.parquet", rejected, RejectedCandidate))]}
