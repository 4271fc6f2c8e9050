"""Read and validate the seed file, and split it into the batches the flow fans out over."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

from codeclm.endpoints import check_context
from codeclm.errors import SeedFileError
from codeclm.records import Seed
from codeclm.settings import Settings
from codeclm.storage import load_seeds, write_records
from tasks._base import Ref, codec_task, ref_to


def sample(seeds: list[Seed], settings: Settings) -> list[Seed]:
    """The seeds a run uses: all, or a reproducible sample in file order."""
    if settings.seed_sample is None or settings.seed_sample >= len(seeds):
        return seeds
    keep = set(random.Random(settings.seed).sample(range(len(seeds)), settings.seed_sample))
    return [s for i, s in enumerate(seeds) if i in keep]


def split(seeds: list[Seed], batch_size: int) -> list[list[Seed]]:
    n = max(1, math.ceil(len(seeds) / batch_size))
    return [seeds[i * batch_size:(i + 1) * batch_size] for i in range(n)]


@codec_task("seeds", run_name="load seeds · {source}")
def prepare_seeds(source: str, source_sha: str, settings: Settings) -> list[Ref]:
    """Validated seeds as one Parquet file per batch; `source_sha` makes the cache follow the file's content."""
    seeds = sample(load_seeds(Path(source)), settings)
    key = f"{source_sha}:{settings.batch_size}:{settings.seed_sample}:{settings.seed}"
    out = settings.work_dir / "seeds" / hashlib.sha256(key.encode()).hexdigest()[:20]
    return [ref_to(write_records(out / f"batch-{i:04d}.parquet", batch, Seed))
            for i, batch in enumerate(split(seeds, settings.batch_size))]


ENCODE_OVERHEAD_TOKENS = 600
_VALIDATED: dict[tuple[str, ...], list[Seed]] = {}  # the CLI validates before the flow; the flow need not again


def validate_seeds(source: Path, settings: Settings) -> list[Seed]:
    """Every check that needs no Prefect and no LLM call, so bad input fails in a second with one line."""
    try:
        stat = source.stat()
        key: tuple[str, ...] | None = (str(source.resolve()), str(stat.st_mtime_ns), str(stat.st_size),
                                       settings.strong.model_dump_json())
    except OSError:
        key = None  # load_seeds says what is wrong with it
    if key in _VALIDATED:
        return _VALIDATED[key]
    seeds = load_seeds(source)
    check_context([(f"seed {s.seed_id}", s.instruction) for s in seeds], settings, "strong",
                  ENCODE_OVERHEAD_TOKENS, str(source))
    if key is not None and not source.is_dir():
        _VALIDATED[key] = seeds
    return seeds


def source_sha(source: Path) -> str:
    """Content hash of a seed file or of every Parquet file in a seed directory."""
    if not source.exists():
        raise SeedFileError(f"{source}: no such file or directory; pass a Parquet, JSONL or CSV file of seeds")
    digest = hashlib.sha256()
    files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()
