"""Metadata augmentation (paper A.3): mix and match use cases and skills from different seeds up to N."""

from __future__ import annotations

import hashlib
import json
import math
import random

from codeclm.records import Metadata
from codeclm.settings import Settings
from codeclm.storage import write_records
from tasks._base import Ref, codec_task, read, ref_to
from tasks.encode import metadata_of


def mix_and_match(originals: list[Metadata], target: int, max_skills: int, seed: int) -> list[Metadata]:
    """Merge duplicates, then add (one use case, 1..max_skills skills without replacement) pairs until
    `target` or until no new pair turns up (few seeds give few pairs). With more distinct originals than
    `target`, a reproducible sample of `target` originals is used instead."""
    merged: dict[str, Metadata] = {}
    for m in originals:
        if m.metadata_id in merged:
            merged[m.metadata_id].seed_ids = sorted({*merged[m.metadata_id].seed_ids, *m.seed_ids})
        else:
            merged[m.metadata_id] = m.model_copy(deep=True)
    rng = random.Random(seed)
    if len(merged) > target:
        return [merged[k] for k in sorted(rng.sample(sorted(merged), target))]
    use_cases = sorted({m.use_case for m in merged.values()})
    skills = sorted({s for m in merged.values() for s in m.skills})
    misses = 0
    while len(merged) < target and skills and misses < 50 * target:
        use_case = rng.choice(use_cases)
        chosen = rng.sample(skills, rng.randint(1, min(max_skills, len(skills))))
        sources = sorted({sid for m in merged.values() if m.origin == "seed"
                          and (m.use_case == use_case or set(m.skills) & set(chosen)) for sid in m.seed_ids})
        candidate = metadata_of(use_case, chosen, "augmented", sources)
        if candidate.metadata_id in merged:
            misses += 1
            continue
        merged[candidate.metadata_id] = candidate
    return list(merged.values())


@codec_task("augment", run_name="augment metadata · {n_batches} batches")
def augment(metadata: list[Ref], settings: Settings, n_batches: int) -> list[Ref]:
    """All encoded metadata in, `n_batches` Parquet files of augmented metadata out (one per seed batch)."""
    originals = [m for ref in metadata for m in read(ref, Metadata)]
    pool = mix_and_match(originals, settings.n_metadata, settings.augment_max_skills, settings.seed)
    pool.sort(key=lambda m: (m.origin != "seed", m.metadata_id))
    size = max(1, math.ceil(len(pool) / n_batches))
    digest = hashlib.sha256(json.dumps([[r["sha"] for r in metadata], settings.n_metadata,
                                        settings.augment_max_skills, settings.seed, n_batches]).encode())
    out = settings.work_dir / "augment" / digest.hexdigest()[:20]
    return [ref_to(write_records(out / f"metadata-{i:04d}.parquet",
                                 pool[i * size:(i + 1) * size], Metadata)) for i in range(n_batches)]
