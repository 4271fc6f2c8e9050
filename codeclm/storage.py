"""Parquet in and out, validated against the record schemas, written atomically; seed loading."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from codeclm.benchmarks import PROMPT_COLUMNS, row_format
from codeclm.errors import DatasetError, SeedFileError
from codeclm.records import Record, Seed, content_id

R = TypeVar("R", bound=Record)


def write_records(path: Path, records: Sequence[Record], model: type[R]) -> Path:
    """Write rows with the model's Arrow schema, via a temp file and rename so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = model.arrow_schema()
    table = pa.Table.from_pylist([r.model_dump() for r in records], schema=schema)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_records(path: Path, model: type[R]) -> list[R]:
    """Read a Parquet file back into models, checking its schema first."""
    table = pq.read_table(path)
    check_schema(path, table.schema, model)
    return [model.model_validate(row) for row in table.to_pylist()]


def check_schema(path: Path, schema: pa.Schema, model: type[Record]) -> None:
    expected = model.arrow_schema()
    if not schema.remove_metadata().equals(expected):
        raise DatasetError(f"{path}: schema does not match {model.__name__}: got {schema}, want {expected}")


def write_json(path: Path, payload: object, sync: bool = False) -> Path:
    """A JSON file replaced whole (temp file, then rename); `sync`: fsynced before the rename and its folder
    after, for a commit point that must survive a power loss (a refresh's registry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w") as fh:
        fh.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if sync:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def write_text(path: Path, text: str) -> Path:
    """A text file replaced whole (temp file, then rename), so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def file_sha256(path: Path) -> str:
    """The sha256 a manifest records for a published file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions and Python, for a manifest."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found | {"python": platform.python_version()}


def load_seeds(path: Path) -> list[Seed]:
    """Read and validate seeds from a Parquet file or directory, JSONL or CSV; every error names file and row.

    The prompt is read by the rule benchmark questions are read by (`codeclm.benchmarks.row_format`), so any of
    the paper's four benchmark files is a seed file too, and a seed reads exactly as the same question would.
    """
    frame = _read_seed_frame(path)
    if frame.empty:
        raise SeedFileError(f"{path}: no seed rows; add at least one instruction")
    fmt = row_format([str(c) for c in frame.columns])
    if fmt is None:
        raise SeedFileError(
            f"{path}: no instruction column; expected one of {', '.join(PROMPT_COLUMNS)} or the layout of a "
            f"known benchmark (Evol-Instruct, Vicuna, Self-Instruct, Koala), found {', '.join(map(str, frame.columns))}"
        )
    seeds: list[Seed] = []
    seen: dict[str, int] = {}
    for row, record in enumerate(frame.to_dict("records")):
        value = fmt.prompt(record)
        if not isinstance(value, str):
            raise SeedFileError(f"{path}: row {row}: {fmt.name} must be text, got {type(value).__name__}")
        if not value.strip():
            raise SeedFileError(f"{path}: row {row}: {fmt.name} is empty")
        seed_id = str(record[fmt.id_column]) if fmt.id_column else content_id("seed", value.strip())
        if seed_id in seen:
            what = f"{fmt.id_column} {seed_id!r}" if fmt.id_column else "instruction text"
            raise SeedFileError(f"{path}: row {row} repeats the {what} of row {seen[seed_id]}; make ids unique")
        seen[seed_id] = row
        try:
            seeds.append(Seed(seed_id=seed_id, instruction=value.strip()))
        except ValidationError as exc:
            raise SeedFileError(f"{path}: row {row}: {exc.errors()[0]['msg']}") from None
    return seeds


def _read_seed_frame(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise SeedFileError(f"{path}: no such file or directory; pass a Parquet, JSONL or CSV file of seeds")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise SeedFileError(f"{path}: directory holds no *.parquet files")
    if any(f.stat().st_size == 0 for f in files):
        raise SeedFileError(f"{path}: file is empty; add seed instructions")
    try:
        return pd.concat([_read_one(f) for f in files], ignore_index=True)
    except SeedFileError:
        raise
    except Exception as exc:  # pyarrow, pandas and json each raise their own types for a corrupt file
        raise SeedFileError(f"{path}: cannot read seeds ({type(exc).__name__}: {exc}); "
                            "expected Parquet, JSONL or CSV") from None


def _read_one(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    raise SeedFileError(f"{path}: unsupported file type {suffix or '(none)'}; use .parquet, .jsonl or .csv")
