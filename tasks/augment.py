"""Metadata augmentation (paper A.3): mix and match use cases and skills from different seeds up to N."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter

from codeclm.records import Metadata
from codeclm.settings import StageSettings
from codeclm.storage import write_records
from tasks._base import Ref, codec_task, read, ref_to
from tasks.encode import metadata_of


def _weighted_sample(rng: random.Random, weights: Counter[str], k: int) -> list[str]:
    """k distinct items, each draw weighted by its count (sampling without replacement)."""
    items = sorted(weights)
    counts = [weights[i] for i in items]
    chosen = []
    for _ in range(k):
        pick = rng.choices(range(len(items)), weights=counts)[0]
        chosen.append(items.pop(pick))
        counts.pop(pick)
    return chosen


def mix_and_match(originals: list[Metadata], target: int, max_skills: int, seed: int) -> list[Metadata]:
    """Merge duplicates, then add (one use case, 1..max_skills skills) pairs until `target` or until no new pair
    turns up (few seeds give few pairs). Mixed across instructions as in the paper (A.3): the use case is drawn
    from the seeds' distribution (a use case of many seeds comes up more often), and the skills, without
    replacement and weighted by how many seeds need them, from seeds with another use case, so no pair re-makes
    a seed's own metadata. With more distinct originals than `target`, a reproducible sample of them is used."""
    merged: dict[str, Metadata] = {}
    for m in originals:
        if m.metadata_id in merged:
            merged[m.metadata_id].seed_ids = sorted({*merged[m.metadata_id].seed_ids, *m.seed_ids})
        else:
            merged[m.metadata_id] = m.model_copy(deep=True)
    rng = random.Random(seed)
    if len(merged) > target:
        return [merged[k] for k in sorted(rng.sample(sorted(merged), target))]
    seeds = [m for m in merged.values() if m.origin == "seed"]
    use_cases: Counter[str] = Counter()
    for m in seeds:
        use_cases[m.use_case] += len(m.seed_ids)
    pools: dict[str, Counter[str]] = {}
    for use_case in use_cases:
        pool: Counter[str] = Counter()
        for m in seeds:
            if m.use_case != use_case:
                pool.update({s: len(m.seed_ids) for s in m.skills})
        if pool:
            pools[use_case] = pool
    weights = Counter({u: n for u, n in use_cases.items() if u in pools})
    misses = 0
    while len(merged) < target and weights and misses < 50 * target:
        (use_case,) = _weighted_sample(rng, weights, 1)
        pool = pools[use_case]
        chosen = _weighted_sample(rng, pool, rng.randint(1, min(max_skills, len(pool))))
        sources = sorted({sid for m in seeds if m.use_case == use_case or set(m.skills) & set(chosen)
                          for sid in m.seed_ids})
        candidate = metadata_of(use_case, chosen, "augmented", sources)
        if candidate.metadata_id in merged:
            misses += 1
            continue
        merged[candidate.metadata_id] = candidate
    return list(merged.values())


def metadata_share(pool: list[Metadata], fraction: float, seed: int) -> list[Metadata]:
    """A reproducible random sample of round(fraction x n) metadata (at least one): Fig. 4 simulates a mismatch
    between metadata and use by decoding the same budget from a random part of M (so more instructions each)."""
    if fraction >= 1:
        return pool
    keep = max(1, round(fraction * len(pool)))
    chosen = set(random.Random(f"{seed}:share").sample(range(len(pool)), keep))
    return [m for i, m in enumerate(pool) if i in chosen]


def for_budget(pool: list[Metadata], keep: int, seed: int) -> list[Metadata]:
    """The metadata that get basic instructions: all, or a reproducible random sample of `keep` when the budget
    asks for fewer instructions than there are metadata (so none is decoded just to be sampled out later)."""
    if keep >= len(pool):
        return pool
    chosen = set(random.Random(f"{seed}:budget").sample(range(len(pool)), keep))
    return [m for i, m in enumerate(pool) if i in chosen]


@codec_task("augment", run_name="augment metadata · {n_batches} batches")
def augment(metadata: list[Ref], settings: StageSettings, n_batches: int) -> list[Ref]:
    """All encoded metadata in, `n_batches` Parquet files of augmented metadata out (one per seed batch)."""
    originals = [m for ref in metadata for m in read(ref, Metadata)]
    pool = mix_and_match(originals, settings.n_metadata, settings.augment_max_skills, settings.seed)
    pool.sort(key=lambda m: (m.origin != "seed", m.metadata_id))
    pool = metadata_share(pool, settings.metadata_fraction, settings.seed)
    pool = for_budget(pool, settings.metadata_to_decode(len(pool)), settings.seed)
    size = max(1, math.ceil(len(pool) / n_batches))
    digest = hashlib.sha256(json.dumps([[r["sha"] for r in metadata], settings.n_metadata,
                                        settings.augment_max_skills, settings.seed, n_batches,
                                        settings.metadata_to_decode(settings.n_metadata),
                                        settings.metadata_fraction]).encode())
    out = settings.work_dir / "augment" / digest.hexdigest()[:20]
    return [ref_to(write_records(out / f"metadata-{i:04d}.parquet",
                                 pool[i * size:(i + 1) * size], Metadata)) for i in range(n_batches)]
