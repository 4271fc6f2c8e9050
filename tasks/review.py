"""The review gates' steps (codeclm.ops.review): the augmented metadata before decoding, the dataset before it
is published. A gate that was answered is not asked again for the same input (the task's cache)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown

from codeclm.ops.review import MetadataReview, ReviewRejected, ask
from codeclm.profile import MARKDOWN_FILE, artifact_markdown, metadata_markdown
from codeclm.records import Metadata
from codeclm.settings import StageSettings
from codeclm.storage import write_records
from tasks._base import Ref, codec_task, read, ref_to


def _print(markdown: str) -> None:
    Console(width=100).print(Markdown(markdown))


@codec_task("review", run_name="review metadata", retries=0)
def review_metadata(batches: list[Ref], settings: StageSettings) -> list[Ref]:
    """Pause until the metadata are reviewed; returns the batches without the metadata the reviewer dropped."""
    rows = [m for ref in batches for m in read(ref, Metadata)]
    text = metadata_markdown([m.model_dump() for m in rows])
    answer = ask("metadata", text, settings.review_timeout, lambda: _print(text), {m.metadata_id for m in rows})
    dropped = set(answer.dropped()) if isinstance(answer, MetadataReview) else set()
    if not dropped:
        return batches
    kept = [[m for m in read(ref, Metadata) if m.metadata_id not in dropped] for ref in batches]
    if not any(kept):
        raise ReviewRejected("the reviewer dropped every metadata; nothing is left to decode")
    digest = hashlib.sha256(" ".join(sorted(dropped) + [r["sha"] for r in batches]).encode()).hexdigest()[:16]
    folder = settings.work_dir / "review" / digest
    print(f"review: {len(dropped)} metadata dropped, {sum(map(len, kept))} go on to decoding")
    return [ref_to(write_records(folder / f"metadata-{i:03d}.parquet", rows_i, Metadata))
            for i, rows_i in enumerate(kept)]


def review_dataset(staging: Path, timeout: float | None, title: str) -> None:
    """Inside the export, before the flip: pause until the staged dataset (its profile and samples) is reviewed;
    a rejection raises, so the staging folder is discarded and nothing is published."""
    ask("dataset", artifact_markdown(staging, title), timeout,
        lambda: _print((staging / MARKDOWN_FILE).read_text()))
