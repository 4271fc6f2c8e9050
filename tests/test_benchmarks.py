"""Benchmark loaders on the shared copies of the four public test sets, user files and every error case.

The benchmark text is read from ../shared at test time; none of it is copied into the repository.
"""

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pandas as pd
import pytest

from codeclm.benchmarks import BENCHMARKS, BenchmarkQuestion, load_benchmark
from codeclm.errors import BenchmarkError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
FILES = {
    "vicuna": "vicuna_80.jsonl",
    "self-instruct": "self_instruct_252.jsonl",
    "koala": "koala_180.jsonl",
    "evol-instruct": "evol_instruct_218.jsonl",
}
COUNTS = {"vicuna": 80, "self-instruct": 252, "koala": 180, "evol-instruct": 218}


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHARED / FILES[name]).read_text(encoding="utf-8").splitlines()]


def _shared_fetch(calls: list[str]) -> Callable[[str], bytes]:
    """A download that serves the shared copy of whichever benchmark owns the URL, and records the call."""
    by_url = {source.url: SHARED / FILES[name] for name, source in BENCHMARKS.items()}

    def fetch(url: str) -> bytes:
        calls.append(url)
        return by_url[url].read_bytes()

    return fetch


def _never_fetch(url: str) -> bytes:
    raise AssertionError(f"fetch called for {url}, the cache should have been used")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- the four benchmarks ---------------------------------------------------------------------------------


def test_known_names_match_the_papers_counts() -> None:
    assert {name: source.count for name, source in BENCHMARKS.items()} == COUNTS
    assert all(source.url.startswith("https://raw.githubusercontent.com/") for source in BENCHMARKS.values())


@pytest.mark.parametrize("name", list(FILES))
def test_load_by_path(name: str, tmp_path: Path) -> None:
    questions = load_benchmark(str(SHARED / FILES[name]), cache_dir=tmp_path)
    assert len(questions) == COUNTS[name]
    assert all(isinstance(question, BenchmarkQuestion) and question.prompt.strip() for question in questions)
    assert {question.benchmark for question in questions} == {Path(FILES[name]).stem}
    assert len({question.question_id for question in questions}) == COUNTS[name]
    assert list(tmp_path.iterdir()) == []  # a path is read in place, not cached


@pytest.mark.parametrize("name", list(FILES))
def test_load_by_name_downloads_once_then_uses_cache(name: str, tmp_path: Path) -> None:
    calls: list[str] = []
    first = load_benchmark(name, cache_dir=tmp_path, fetch=_shared_fetch(calls))
    assert calls == [BENCHMARKS[name].url]
    cache = tmp_path / f"{name}.jsonl"
    assert cache.read_bytes() == (SHARED / FILES[name]).read_bytes()
    assert [path.name for path in tmp_path.iterdir()] == [cache.name]  # no temp file left behind

    second = load_benchmark(name, cache_dir=tmp_path, fetch=_never_fetch)
    assert second == first
    assert len(second) == COUNTS[name]
    assert {question.benchmark for question in second} == {name}


def test_name_is_case_and_underscore_tolerant(tmp_path: Path) -> None:
    calls: list[str] = []
    questions = load_benchmark(" Self_Instruct ", cache_dir=tmp_path / "new" / "dir", fetch=_shared_fetch(calls))
    assert len(questions) == 252 and len(calls) == 1


def test_vicuna_fields(tmp_path: Path) -> None:
    rows = _rows("vicuna")
    questions = load_benchmark(str(SHARED / FILES["vicuna"]), cache_dir=tmp_path)
    assert [q.prompt for q in questions] == [row["turns"][0] for row in rows]
    assert [q.question_id for q in questions] == [str(row["question_id"]) for row in rows]
    assert [q.category for q in questions] == [row["category"] for row in rows]


def test_vicuna_original_eval_table_uses_text(tmp_path: Path) -> None:
    rows = [
        {"question_id": row["question_id"], "text": row["turns"][0], "category": row["category"]}
        for row in _rows("vicuna")
    ]
    table = _write_jsonl(tmp_path / "question.jsonl", rows)
    by_path = load_benchmark(str(table), cache_dir=tmp_path)
    assert [q.prompt for q in by_path] == [row["text"] for row in rows]
    by_name = load_benchmark("vicuna", cache_dir=tmp_path / "cache", fetch=lambda url: table.read_bytes())
    assert [q.prompt for q in by_name] == [row["text"] for row in rows]


def test_self_instruct_appends_input_only_when_not_empty(tmp_path: Path) -> None:
    rows = _rows("self-instruct")
    questions = load_benchmark(str(SHARED / FILES["self-instruct"]), cache_dir=tmp_path)
    with_input = without_input = 0
    for row, question in zip(rows, questions, strict=True):
        instruction, extra = row["instruction"], row["instances"][0]["input"]
        assert question.question_id == row["id"]
        if extra.strip():
            with_input += 1
            assert question.prompt == f"{instruction} Input: {extra}"
        else:
            without_input += 1
            assert question.prompt == instruction
            assert " Input: " not in question.prompt
    assert with_input > 0 and without_input > 0


def test_koala_and_evol_instruct_fields(tmp_path: Path) -> None:
    koala = load_benchmark(str(SHARED / FILES["koala"]), cache_dir=tmp_path)
    assert [(q.question_id, q.prompt) for q in koala] == [(row["id"], row["prompt"]) for row in _rows("koala")]
    evol = load_benchmark(str(SHARED / FILES["evol-instruct"]), cache_dir=tmp_path)
    expected = [(str(row["idx"]), row["Instruction"], row["Skill"]) for row in _rows("evol-instruct")]
    assert [(q.question_id, q.prompt, q.category) for q in evol] == expected


def test_limit_takes_the_first_questions_in_file_order(tmp_path: Path) -> None:
    questions = load_benchmark(str(SHARED / FILES["koala"]), cache_dir=tmp_path, limit=5)
    assert [q.question_id for q in questions] == [row["id"] for row in _rows("koala")[:5]]
    assert len(load_benchmark(str(SHARED / FILES["koala"]), cache_dir=tmp_path, limit=180)) == 180


def test_known_format_in_parquet(tmp_path: Path) -> None:
    path = tmp_path / "si.parquet"
    pd.DataFrame(_rows("self-instruct")).to_parquet(path)
    from_parquet = load_benchmark(str(path), cache_dir=tmp_path)
    from_jsonl = load_benchmark(str(SHARED / FILES["self-instruct"]), cache_dir=tmp_path)
    assert [q.prompt for q in from_parquet] == [q.prompt for q in from_jsonl]


# --- user files ----------------------------------------------------------------------------------------

USER_ROWS = [
    {"question_id": "q1", "query": "How do tides work?", "category": "science"},
    {"question_id": "q2", "query": "Write a haiku about rain.", "category": "writing"},
    {"question_id": "q3", "query": "Sort a list in Python.", "category": "code"},
]


def test_csv_with_custom_prompt_column(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    pd.DataFrame(USER_ROWS).to_csv(path, index=False)
    questions = load_benchmark(str(path), cache_dir=tmp_path, prompt_column="query")
    assert questions == [
        BenchmarkQuestion(
            benchmark="mine", question_id=row["question_id"], prompt=row["query"], category=row["category"]
        )
        for row in USER_ROWS
    ]


def test_parquet_with_custom_prompt_column_and_row_number_ids(tmp_path: Path) -> None:
    path = tmp_path / "mine.parquet"
    pd.DataFrame([{"query": row["query"]} for row in USER_ROWS]).to_parquet(path)
    questions = load_benchmark(str(path), cache_dir=tmp_path, prompt_column="query")
    assert [(q.benchmark, q.question_id, q.prompt) for q in questions] == [
        ("mine", str(number), row["query"]) for number, row in enumerate(USER_ROWS, start=1)
    ]


@pytest.mark.parametrize("column", ["prompt", "instruction", "text", "question"])
def test_default_prompt_columns(column: str, tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"id": 7, column: "Explain recursion."}]), encoding="utf-8")
    assert load_benchmark(str(path), cache_dir=tmp_path) == [
        BenchmarkQuestion(benchmark="mine", question_id="7", prompt="Explain recursion.")
    ]


# --- errors --------------------------------------------------------------------------------------------


def _message(excinfo: pytest.ExceptionInfo[BenchmarkError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError) as excinfo:
        load_benchmark("alpaca-eval", cache_dir=tmp_path)
    message = _message(excinfo)
    assert "alpaca-eval" in message
    assert all(name in message for name in BENCHMARKS)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(BenchmarkError, match="not found") as excinfo:
        load_benchmark(str(missing), cache_dir=tmp_path)
    assert str(missing) in _message(excinfo)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bad.jsonl", b'{"prompt": "ok"}\n{not json\n'),
        ("bad.jsonl", b'["a list, not an object"]\n'),
        ("bad.json", b"{broken"),
        ("bad.json", b'{"prompt": "an object, not an array"}'),
        ("bad.parquet", b"this is not parquet"),
        ("bad.csv", b"\xff\xfe\x00garbage\x00"),
        ("bad.jsonl", b"\xff\xfe not utf-8"),
        ("bad.txt", b"prompt\nhello\n"),
    ],
)
def test_unreadable_or_corrupt_file(name: str, content: bytes, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BenchmarkError) as excinfo:
        load_benchmark(str(path), cache_dir=tmp_path)
    assert str(path) in _message(excinfo)


def test_no_prompt_column_lists_columns_found(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"id": 1, "body": "x", "topic": "y"}])
    with pytest.raises(BenchmarkError) as excinfo:
        load_benchmark(str(path), cache_dir=tmp_path)
    assert "id, body, topic" in _message(excinfo)
    with pytest.raises(BenchmarkError, match=r"no column 'query'.*id, body, topic"):
        load_benchmark(str(path), cache_dir=tmp_path, prompt_column="query")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n\n"),
        ("empty.csv", ""),
        ("empty.json", "[]"),
        ("header.csv", "prompt,id\n"),
    ],
)
def test_empty_benchmark(name: str, content: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BenchmarkError, match="no questions"):
        load_benchmark(str(path), cache_dir=tmp_path)


@pytest.mark.parametrize("bad", ["", "   ", None, 42, ["a list"]])
def test_empty_or_non_string_prompt_gives_row_number(bad: object, tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "fine"}, {"prompt": "fine too"}, {"prompt": bad}])
    with pytest.raises(BenchmarkError, match="row 3") as excinfo:
        load_benchmark(str(path), cache_dir=tmp_path)
    _message(excinfo)


def test_empty_prompt_in_csv_gives_row_number(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text('id,prompt\na,"What is 2+2?"\nb,\n', encoding="utf-8")
    with pytest.raises(BenchmarkError, match="row 2"):
        load_benchmark(str(path), cache_dir=tmp_path)


def test_duplicate_ids(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mine.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}]
    )
    with pytest.raises(BenchmarkError, match=r"'a' appears twice \(rows 1 and 3\)"):
        load_benchmark(str(path), cache_dir=tmp_path)


def test_missing_id_in_one_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"id": "a", "prompt": "x"}, {"prompt": "y"}])
    with pytest.raises(BenchmarkError, match="row 2 has no id"):
        load_benchmark(str(path), cache_dir=tmp_path)


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_below_one(limit: int, tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="at least 1"):
        load_benchmark(str(SHARED / FILES["vicuna"]), cache_dir=tmp_path, limit=limit)


def test_limit_above_count_says_the_count(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="has 80 questions") as excinfo:
        load_benchmark(str(SHARED / FILES["vicuna"]), cache_dir=tmp_path, limit=81)
    _message(excinfo)


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
        httpx.ReadTimeout("timed out"),
        httpx.HTTPStatusError("404 Not Found", request=httpx.Request("GET", "https://x"), response=httpx.Response(404)),
    ],
)
def test_offline_download_gives_clear_message(error: Exception, tmp_path: Path) -> None:
    def fetch(url: str) -> bytes:
        raise error

    with pytest.raises(BenchmarkError) as excinfo:
        load_benchmark("koala", cache_dir=tmp_path, fetch=fetch)
    message = _message(excinfo)
    assert "could not be downloaded" in message
    assert "offline" in message
    assert "local path" in message
    assert BENCHMARKS["koala"].url in message
    assert list(tmp_path.iterdir()) == []


def test_bad_download_is_not_cached(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="not valid JSON"):
        load_benchmark("vicuna", cache_dir=tmp_path, fetch=lambda url: b"<html>rate limited</html>")
    truncated = b"".join((SHARED / FILES["vicuna"]).read_bytes().splitlines(keepends=True)[:10])
    with pytest.raises(BenchmarkError, match="has 10 questions but the vicuna benchmark has 80"):
        load_benchmark("vicuna", cache_dir=tmp_path, fetch=lambda url: truncated)
    with pytest.raises(BenchmarkError, match="does not have the columns of vicuna"):
        load_benchmark("vicuna", cache_dir=tmp_path, fetch=lambda url: (SHARED / FILES["koala"]).read_bytes())
    assert list(tmp_path.iterdir()) == []


def test_damaged_cache_says_how_to_recover(tmp_path: Path) -> None:
    (tmp_path / "koala.jsonl").write_text('{"id": "k1", "prompt": "only one"}\n', encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"delete .*koala\.jsonl"):
        load_benchmark("koala", cache_dir=tmp_path, fetch=_never_fetch)
