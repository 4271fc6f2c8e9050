"""Split the checked seed file (`codeclm.checks.check_generate`) into the batches the flow fans out over."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

from codeclm.checks import loaded_seeds
from codeclm.records import Seed
from codeclm.settings import StageSettings
from codeclm.storage import write_records
from tasks._base import Ref, codec_task, ref_to


def sample(seeds: list[Seed], settings: StageSettings) -> list[Seed]:
    """The seeds a run uses: all, or a reproducible sample in file order."""
    if settings.seed_sample is None or settings.seed_sample >= len(seeds):
        return seeds
    keep = set(random.Random(settings.seed).sample(range(len(seeds)), settings.seed_sample))
    return [s for i, s in enumerate(seeds) if i in keep]


def split(seeds: list[Seed], batch_size: int) -> list[list[Seed]]:
    n = max(1, math.ceil(len(seeds) / batch_size))
    return [seeds[i * batch_size:(i + 1) * batch_size] for i in range(n)]


@codec_task("seeds", run_name="load seeds · {source}")
def prepare_seeds(source: str, source_sha: str, settings: StageSettings) -> list[Ref]:
    """Validated seeds as one Parquet file per batch; `source_sha` makes the cache follow the file's content."""
    seeds = sample(loaded_seeds(Path(source), source_sha), settings)
    key = f"{source_sha}:{settings.batch_size}:{settings.seed_sample}:{settings.seed}"
    out = settings.work_dir / "seeds" / hashlib.sha256(key.encode()).hexdigest()[:20]
    return [ref_to(write_records(out / f"batch-{i:04d}.parquet", batch, Seed))
            for i, batch in enumerate(split(seeds, settings.batch_size))]
