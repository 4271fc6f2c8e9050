"""Loaders for the four open benchmarks CodecLM reports CRR on (paper §5.1), and for any user file.

A known name is downloaded once from its public source into a cache directory (the project ships no
benchmark text); a path is read locally. The row format of a known benchmark is recognised from its
columns, so a local copy of a public file loads exactly like the download.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from pydantic import BaseModel

from codeclm.errors import BenchmarkError

DOWNLOAD_TIMEOUT_S = 30.0
FILE_TYPES = {".jsonl": "JSONL", ".json": "JSON", ".parquet": "Parquet", ".csv": "CSV"}
_ANY_FILE = "a JSONL, JSON, Parquet or CSV file"
# Plain files (seeds and questions alike): the first of these columns holds the prompt, and of the id columns.
PROMPT_COLUMNS = ("instruction", "prompt", "text", "question")
ID_COLUMNS = ("seed_id", "question_id", "id", "idx")

Row = Mapping[str, Any]


class BenchmarkQuestion(BaseModel):
    """One test prompt. The id is a string so ids from every source compare alike."""

    benchmark: str
    question_id: str
    prompt: str
    category: str | None = None


@dataclass(frozen=True)
class RowFormat:
    """How one public file lays out a question: the columns that identify it and where the prompt is."""

    name: str
    keys: frozenset[str]
    prompt: Callable[[Row], object]
    id_column: str | None
    category_column: str | None = None


def _first(value: object) -> object:
    """First element of a list cell (a JSON list, or a numpy array when read from Parquet)."""
    items = value.tolist() if isinstance(value, np.ndarray) else value
    return items[0] if isinstance(items, list | tuple) and items else None


def _column(name: str) -> Callable[[Row], object]:
    return lambda row: row.get(name)


def _self_instruct_prompt(row: Row) -> object:
    """Alpagasus convention: the instance input is appended only when it is not empty."""
    instruction = row.get("instruction")
    instance = _first(row.get("instances"))
    extra = instance.get("input") if isinstance(instance, Mapping) else None
    if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
        return f"{instruction} Input: {extra}"
    return instruction


VICUNA = RowFormat(
    "vicuna", frozenset({"question_id", "turns"}), lambda row: _first(row.get("turns")), "question_id", "category"
)
VICUNA_TABLE = RowFormat(
    "vicuna (eval table)", frozenset({"question_id", "text"}), _column("text"), "question_id", "category"
)
SELF_INSTRUCT = RowFormat("self-instruct", frozenset({"id", "instruction", "instances"}), _self_instruct_prompt, "id")
KOALA = RowFormat("koala", frozenset({"id", "prompt"}), _column("prompt"), "id")
EVOL_INSTRUCT = RowFormat("evol-instruct", frozenset({"idx", "Instruction"}), _column("Instruction"), "idx", "Skill")
# Detected in local files, most specific first. Koala's (id, prompt) is left to the plain reader, which
# reads it the same way and also keeps a `category` column that a user file may have.
_KNOWN_FORMATS = (SELF_INSTRUCT, EVOL_INSTRUCT, VICUNA, VICUNA_TABLE)


@dataclass(frozen=True)
class BenchmarkSource:
    """A public benchmark: where to download it, how many questions the paper's CRR denominators assume."""

    url: str
    count: int
    formats: tuple[RowFormat, ...]


_RAW = "https://raw.githubusercontent.com"
BENCHMARKS: dict[str, BenchmarkSource] = {
    "vicuna": BenchmarkSource(
        f"{_RAW}/lm-sys/FastChat/main/fastchat/llm_judge/data/vicuna_bench/question.jsonl",
        80,
        (VICUNA, VICUNA_TABLE),
    ),
    "self-instruct": BenchmarkSource(
        f"{_RAW}/yizhongw/self-instruct/main/human_eval/user_oriented_instructions.jsonl", 252, (SELF_INSTRUCT,)
    ),
    "koala": BenchmarkSource(f"{_RAW}/arnav-gudibande/koala-test-set/main/koala_test_set.jsonl", 180, (KOALA,)),
    "evol-instruct": BenchmarkSource(
        f"{_RAW}/nlpxucan/WizardLM/main/WizardLM/data/WizardLM_testset.jsonl", 218, (EVOL_INSTRUCT,)
    ),
}


def load_benchmark(
    spec: str,
    *,
    cache_dir: Path,
    prompt_column: str | None = None,
    limit: int | None = None,
    fetch: Callable[[str], bytes] | None = None,
) -> list[BenchmarkQuestion]:
    """Questions of a known benchmark name or of a JSONL/JSON/Parquet/CSV file, in file order.

    `prompt_column`, when given, overrides format detection. `limit` keeps the first N questions.
    """
    if limit is not None and limit < 1:
        raise BenchmarkError(f"Benchmark limit must be at least 1, got {limit}.")
    name = spec.strip().lower().replace("_", "-")
    if name in BENCHMARKS:
        questions = _load_known(name, BENCHMARKS[name], cache_dir, prompt_column, fetch or _download)
    else:
        path = _existing_file(spec)
        rows = _read_rows(path)
        columns = _columns(rows, str(path))
        questions = _questions(rows, path.stem, _file_format(columns, prompt_column, str(path)), str(path))
    if limit is not None and limit > len(questions):
        raise BenchmarkError(
            f"Benchmark limit {limit} is larger than {spec}, which has {len(questions)} questions; "
            f"use a limit of at most {len(questions)}."
        )
    return questions[:limit]


# Alpaca's instructions (Taori et al. 2023; CC BY-NC 4.0): the seed pool the paper (A.2) samples for Self-Instruct,
# Tree-Instruct, WizardLM and Alpagasus. A JSON list of {instruction, input, output}; only the first two are read.
ALPACA_URL = f"{_RAW}/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
ALPACA_COUNT = 52002
ALPACA = RowFormat("alpaca", frozenset({"instruction", "input", "output"}), lambda row: alpaca_prompt(row), None)


def alpaca_prompt(row: Row) -> object:
    """One stated rule, Self-Instruct's: the instruction, then " Input: {input}" when the input is not empty."""
    instruction, given = row.get("instruction"), row.get("input")
    if isinstance(given, str) and given.strip() and isinstance(instruction, str):
        return f"{instruction} Input: {given}"
    return instruction


def load_alpaca(spec: str, *, cache_dir: Path, fetch: Callable[[str], bytes] | None = None
                ) -> list[BenchmarkQuestion]:
    """Alpaca's instructions as questions named `alpaca`, ids their row numbers (1-based): `spec` 'alpaca' reads
    the copy downloaded once into `cache_dir` (a bad download is never cached), else a local file in its layout."""
    if spec.strip().lower() == "alpaca":
        cache = cache_dir / "alpaca_data.json"
        if cache.is_file():
            rows, where = _read_rows(cache), str(cache)
        else:
            data = _fetch("alpaca", ALPACA_URL, fetch or _download)
            rows, where = _parse_json(_decode(data, ALPACA_URL), ALPACA_URL), ALPACA_URL
            if len(rows) != ALPACA_COUNT:
                raise BenchmarkError(f"{ALPACA_URL} has {len(rows)} rows, Alpaca has {ALPACA_COUNT}; pass a local "
                                     "path to alpaca_data.json instead.")
            _write_atomic(cache, data)
    else:
        path = _existing_file(spec)
        rows, where = _read_rows(path), str(path)
    missing = ALPACA.keys - set(_columns(rows, where))
    if missing:
        raise BenchmarkError(f"{where} is not in Alpaca's layout (instruction, input, output; missing: "
                             f"{', '.join(sorted(missing))}).")
    return _questions(rows, "alpaca", ALPACA, where)


def _load_known(
    name: str,
    source: BenchmarkSource,
    cache_dir: Path,
    prompt_column: str | None,
    fetch: Callable[[str], bytes],
) -> list[BenchmarkQuestion]:
    """Read the cached copy, or download, check and then cache it (a bad download is never cached)."""
    cache = cache_dir / f"{name}.jsonl"
    downloaded: bytes | None = None
    if cache.is_file():
        rows = _read_rows(cache)
        where, remedy = str(cache), f"delete {cache} to download it again"
    else:
        downloaded = _fetch(name, source.url, fetch)
        rows = _parse_jsonl(_decode(downloaded, source.url), source.url)
        where, remedy = source.url, "pass a local path to the file instead"
    columns = _columns(rows, where)
    fmt = _plain_format(columns, prompt_column, where) if prompt_column else _detect(columns, source.formats)
    if fmt is None:
        expected = " or ".join(", ".join(sorted(known.keys)) for known in source.formats)
        raise BenchmarkError(
            f"{where} does not have the columns of {name} ({expected}; found: {', '.join(columns)}); {remedy}."
        )
    questions = _questions(rows, name, fmt, where)
    if len(questions) != source.count:
        raise BenchmarkError(
            f"{where} has {len(questions)} questions but the {name} benchmark has {source.count}; {remedy}."
        )
    if downloaded is not None:
        _write_atomic(cache, downloaded)
    return questions


def _fetch(name: str, url: str, fetch: Callable[[str], bytes]) -> bytes:
    try:
        return fetch(url)
    except (httpx.HTTPError, OSError) as exc:
        raise BenchmarkError(
            f"Benchmark '{name}' could not be downloaded from {url} ({_one_line(exc)}); "
            "the machine may be offline: pass a local path to the file instead."
        ) from exc


def _decode(data: bytes, url: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BenchmarkError(
            f"The file downloaded from {url} is not UTF-8 text ({exc.reason}); pass a local path to the file instead."
        ) from exc


def _download(url: str) -> bytes:
    response = httpx.get(url, timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=True)
    response.raise_for_status()
    return response.content


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file + os.replace, so an interrupted write never leaves a truncated cache that looks valid."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise BenchmarkError(
            f"Could not write the benchmark cache file {path} ({_one_line(exc)}); choose a writable cache directory."
        ) from exc


def _existing_file(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise BenchmarkError(f"Benchmark path {path} is a directory; pass {_ANY_FILE}.")
    if path.suffix.lower() in FILE_TYPES or "/" in spec or os.sep in spec:
        raise BenchmarkError(f"Benchmark file not found: {path}; check the path.")
    raise BenchmarkError(
        f"Unknown benchmark '{spec}'; known names: {', '.join(BENCHMARKS)}, or pass a path to {_ANY_FILE}."
    )


def _read_rows(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise BenchmarkError(f"Benchmark file {path} has an unsupported type; use {_ANY_FILE}.")
    try:
        if suffix == ".jsonl":
            return _parse_jsonl(path.read_text(encoding="utf-8"), str(path))
        if suffix == ".json":
            return _parse_json(path.read_text(encoding="utf-8"), str(path))
        if suffix == ".parquet":
            return pd.read_parquet(path).to_dict("records")
        return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
    except pd.errors.EmptyDataError:
        return []
    except (OSError, ValueError) as exc:
        raise BenchmarkError(
            f"Benchmark file {path} could not be read ({_one_line(exc)}); check that it is a valid "
            f"{FILE_TYPES[suffix]} file."
        ) from exc


def _parse_jsonl(text: str, where: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"Line {number} of {where} is not valid JSON ({exc.msg}); fix or remove it.") from exc
        if not isinstance(row, dict):
            raise BenchmarkError(f"Line {number} of {where} is not a JSON object; each line must be one question.")
        rows.append(row)
    return rows


def _parse_json(text: str, where: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise BenchmarkError(f"{where} must hold a JSON array of objects, one per question.")
    return data


def _columns(rows: list[Row], where: str) -> list[str]:
    """Column names in first-seen order; an empty benchmark stops here."""
    if not rows:
        raise BenchmarkError(f"{where} has no questions; pass a benchmark with at least one.")
    return list(dict.fromkeys(key for row in rows for key in row))


def _detect(columns: list[str], formats: tuple[RowFormat, ...]) -> RowFormat | None:
    return next((fmt for fmt in formats if fmt.keys <= set(columns)), None)


def row_format(columns: Sequence[str]) -> RowFormat | None:
    """How rows with these columns hold their prompt; the one rule for seed files and benchmark files alike.

    A known benchmark layout first (Self-Instruct's instruction plus its instance input, Evol-Instruct's
    `Instruction`, Vicuna's `turns`), else the first of PROMPT_COLUMNS; None when neither is there.
    """
    known = _detect(list(columns), _KNOWN_FORMATS)
    if known is not None:
        return known
    prompt_column = next((column for column in PROMPT_COLUMNS if column in columns), None)
    return None if prompt_column is None else _plain(columns, prompt_column)


def _file_format(columns: list[str], prompt_column: str | None, where: str) -> RowFormat:
    """A local benchmark file's layout: the named prompt column, else `row_format`'s rule."""
    fmt = _plain_format(columns, prompt_column, where) if prompt_column else row_format(columns)
    if fmt is None:
        raise BenchmarkError(
            f"{where} has no prompt column (looked for {', '.join(PROMPT_COLUMNS)}; "
            f"found: {', '.join(columns)}); name the prompt column explicitly."
        )
    return fmt


def _plain_format(columns: list[str], prompt_column: str, where: str) -> RowFormat:
    """A file whose prompt column is named by the user."""
    if prompt_column not in columns:
        raise BenchmarkError(f"{where} has no column '{prompt_column}'; columns found: {', '.join(columns)}.")
    return _plain(columns, prompt_column)


def _plain(columns: Sequence[str], prompt_column: str) -> RowFormat:
    """One prompt column, an id column if there is one (else the row number)."""
    id_column = next((column for column in ID_COLUMNS if column in columns), None)
    category_column = "category" if "category" in columns else None
    return RowFormat(prompt_column, frozenset({prompt_column}), _column(prompt_column), id_column, category_column)


def _questions(rows: list[Row], benchmark: str, fmt: RowFormat, where: str) -> list[BenchmarkQuestion]:
    questions: list[BenchmarkQuestion] = []
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        prompt = fmt.prompt(row)
        if not isinstance(prompt, str) or not prompt.strip():
            raise BenchmarkError(
                f"{where}: row {number} has an empty or non-text prompt ({fmt.name}); fix or remove that row."
            )
        question_id = _question_id(row, fmt.id_column, number, where)
        if question_id in seen:
            raise BenchmarkError(
                f"{where}: question id {question_id!r} appears twice (rows {seen[question_id]} and {number}); "
                "ids must be unique."
            )
        seen[question_id] = number
        category = row.get(fmt.category_column) if fmt.category_column else None
        questions.append(
            BenchmarkQuestion(
                benchmark=benchmark,
                question_id=question_id,
                prompt=prompt,
                category=category if isinstance(category, str) and category else None,
            )
        )
    return questions


def _question_id(row: Row, column: str | None, number: int, where: str) -> str:
    if column is None:
        return str(number)
    value = row.get(column)
    if value is None or value == "" or value != value:  # value != value: NaN from Parquet/pandas
        raise BenchmarkError(f"{where}: row {number} has no {column}; give every row an id.")
    return str(value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
