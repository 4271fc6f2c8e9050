"""Every record model survives Parquet unchanged, and a file with another schema is refused (D3, D4)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codeclm import records
from codeclm.errors import DatasetError
from codeclm.records import Record, Seed
from codeclm.storage import read_records, write_records

MODELS = sorted((cls for cls in vars(records).values()
                 if isinstance(cls, type) and issubclass(cls, Record) and cls is not Record),
                key=lambda cls: cls.__name__)
UNICODE = "naïve café — 漢字かな 🚀🧪 עברית العربية \u0301e\u200b tab\there\nnewline \"quoted\" \\ back\x00slash"
BIG = ("0123456789abcdé🚀" * 7000)[:100_000]


def _value(annotation: Any, variant: str, index: int) -> Any:
    """A value of `annotation` for one variant: 'plain', 'unicode', 'empty' (minimal / None) or 'big'."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        if variant == "empty" and type(None) in get_args(annotation):
            return None
        annotation = next(a for a in get_args(annotation) if a is not type(None))
        origin = get_origin(annotation)
    if origin is Literal:
        options = get_args(annotation)
        return options[index % len(options)]
    if origin is list:
        (item,) = get_args(annotation)
        if variant == "empty":
            return []
        return [_value(item, variant, index + i) for i in range(3)]
    if annotation is str:
        return {"plain": f"text {index}", "unicode": f"{UNICODE} {index}", "empty": "x", "big": BIG}[variant]
    if annotation is bool:
        return index % 2 == 0
    if annotation is int:
        return {"plain": index, "unicode": -index, "empty": 0, "big": 2**62}[variant]
    if annotation is float:
        return {"plain": index + 0.25, "unicode": -1.5, "empty": 0.0, "big": 1e300}[variant]
    raise AssertionError(f"no test value for {annotation!r}; extend _value()")


def _instances(model: type[Record]) -> list[Record]:
    rows = []
    for variant in ("plain", "unicode", "empty", "big"):
        for index in range(3):
            values = {name: _value(field.annotation, variant, index) for name, field in model.model_fields.items()}
            rows.append(model.model_validate(values))
    return rows


def test_every_record_model_is_covered() -> None:
    names = {cls.__name__ for cls in MODELS}
    assert {"Seed", "Metadata", "RubricSet", "Candidate", "Response", "Judgement", "FilterDecision", "TrainingPair",
            "RejectedCandidate", "FailedCall", "CallStats"} <= names


@pytest.mark.parametrize("model", MODELS, ids=lambda cls: cls.__name__)
def test_round_trip_through_parquet(model: type[Record], tmp_path: Path) -> None:
    rows = _instances(model)
    assert any(isinstance(v, str) and len(v) == 100_000 for r in rows for v in r.model_dump().values())
    path = write_records(tmp_path / f"{model.table}.parquet", rows, model)
    assert read_records(path, model) == rows
    assert pq.read_schema(path).remove_metadata().equals(model.arrow_schema())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temp file was renamed, not left behind


@pytest.mark.parametrize("model", MODELS, ids=lambda cls: cls.__name__)
def test_empty_table_round_trips_with_its_schema(model: type[Record], tmp_path: Path) -> None:
    path = write_records(tmp_path / "empty.parquet", [], model)
    assert read_records(path, model) == []
    assert pq.read_metadata(path).num_rows == 0


def test_optional_fields_are_nullable_and_required_ones_are_not() -> None:
    schema = records.FailedCall.arrow_schema()
    assert schema.field("raw_text").nullable and schema.field("instruction_id").nullable
    assert not schema.field("call_key").nullable
    assert schema.field("attempts").type == pa.int64()
    assert records.Candidate.arrow_schema().field("skills").type == pa.list_(pa.string())


def test_file_of_another_model_is_refused(tmp_path: Path) -> None:
    path = write_records(tmp_path / "seeds.parquet", [Seed(seed_id="s1", instruction="hi")], Seed)
    with pytest.raises(DatasetError, match="does not match Metadata"):
        read_records(path, records.Metadata)


@pytest.mark.parametrize("table", [
    pa.table({"seed_id": ["s1"], "instruction": ["hi"], "extra": [1]}),   # extra column
    pa.table({"seed_id": ["s1"]}),                                         # missing column
    pa.table({"seed_id": [1], "instruction": ["hi"]}),                     # wrong type
    pa.table({"instruction": ["hi"], "seed_id": ["s1"]}),                  # columns in another order
], ids=["extra-column", "missing-column", "wrong-type", "reordered"])
def test_wrong_schema_is_refused(table: pa.Table, tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(DatasetError, match="schema does not match Seed"):
        read_records(path, Seed)


def test_writing_replaces_a_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "seeds.parquet"
    write_records(path, [Seed(seed_id=f"s{i}", instruction="old") for i in range(5)], Seed)
    write_records(path, [Seed(seed_id="new", instruction="new")], Seed)
    assert read_records(path, Seed) == [Seed(seed_id="new", instruction="new")]
