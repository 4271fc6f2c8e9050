"""`codeclm generate` on bad input: one `error:` line on stderr, no traceback, a non-zero exit, nothing published,
and no Prefect run started (every check here runs before any flow and before any LLM call; Prefect's temporary
API server may already be starting beside the model checks, and is stopped again)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codeclm.testing.fake_llm import FakeLLMServer

CODECLM = str(Path(sys.executable).with_name("codeclm"))
GOOD = [{"seed_id": "a", "instruction": "Write a haiku about rain."},
        {"seed_id": "b", "instruction": "Explain recursion to a child."}]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(path: Path, url: str, strong: str = "", target: str = "") -> Path:
    path.write_text(f'[strong]\nmodel = "openai/fake-strong"\napi_base = "{url}"\n{strong}\n'
                    f'[target]\nmodel = "openai/fake-target"\napi_base = "{url}"\n{target}\n')
    return path


# Each case builds its input in tmp and returns the CLI arguments after `generate`; `match` is part of the message.
Case = Callable[[Path, str], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    "missing file": (lambda tmp, url: [str(tmp / "nope.jsonl")], "no such file"),
    "empty file": (lambda tmp, url: [str(_touch(tmp / "seeds.jsonl"))], "file is empty"),
    "text file": (lambda tmp, url: [str(_write(tmp / "seeds.txt", "Write a poem.\n"))], "unsupported file type .txt"),
    "corrupt parquet": (lambda tmp, url: [str(_write(tmp / "seeds.parquet", "PAR1 not really"))],
                        "cannot read seeds"),
    "directory without parquet": (lambda tmp, url: [str(_mkdir(tmp / "seeds"))], "holds no *.parquet"),
    "no instruction column": (lambda tmp, url: [str(_jsonl(tmp / "s.jsonl", [{"seed_id": "a", "task": "x"}]))],
                              "no instruction column"),
    "non-string instruction": (lambda tmp, url: [str(_jsonl(tmp / "s.jsonl", [{"instruction": 5}]))],
                               "row 0: instruction must be text"),
    "empty instruction": (lambda tmp, url: [str(_jsonl(tmp / "s.jsonl", [*GOOD, {"instruction": "   "}]))],
                          "row 2: instruction is empty"),
    "duplicate seed ids": (lambda tmp, url: [str(_parquet(tmp / "s.parquet",
                                                          [*GOOD, {**GOOD[0], "instruction": "x"}]))],
                           "repeats the seed_id 'a' of row 0"),
    "instruction over the context": (lambda tmp, url: [
        str(_jsonl(tmp / "s.jsonl", [*GOOD, {"seed_id": "long", "instruction": "word " * 3000}])),
        "--config", str(_config(tmp / "c.toml", url, strong="context_tokens = 2000\nmax_tokens = 256"))],
        "seed long: instruction is about"),
    "context too small for any prompt": (lambda tmp, url: [
        str(_jsonl(tmp / "s.jsonl", GOOD)),
        "--config", str(_config(tmp / "c.toml", url, strong="context_tokens = 300"))],
        "strong model's context (300 tokens) cannot hold the prompt"),
    "unknown model string": (lambda tmp, url: [
        str(_jsonl(tmp / "s.jsonl", GOOD)), "--config", str(_config(tmp / "c.toml", url)),
        "--strong", "notaprovider/some-model"], "not a model string litellm knows"),
    "missing API key": (lambda tmp, url: [
        str(_jsonl(tmp / "s.jsonl", GOOD)),
        "--config", str(_config(tmp / "c.toml", url, target='api_key_env = "CODECLM_TEST_UNSET_KEY"'))],
        "env var CODECLM_TEST_UNSET_KEY is not set"),
    "unreachable endpoint": (lambda tmp, url: [
        str(_jsonl(tmp / "s.jsonl", GOOD)),
        "--config", str(_config(tmp / "c.toml", f"http://127.0.0.1:{_closed_port()}/v1"))], "is unreachable"),
    "negative threshold": (lambda tmp, url: [str(_jsonl(tmp / "s.jsonl", GOOD)), "--threshold", "-1"],
                           "invalid setting threshold"),
    "zero batch size": (lambda tmp, url: [str(_jsonl(tmp / "s.jsonl", GOOD)), "--batch-size", "0"],
                        "invalid setting batch_size"),
    "bad TOML": (lambda tmp, url: [str(_jsonl(tmp / "s.jsonl", GOOD)),
                                   "--config", str(_write(tmp / "c.toml", "[strong\nmodel = 1\n"))], "not valid TOML"),
    "unknown setting": (lambda tmp, url: [str(_jsonl(tmp / "s.jsonl", GOOD)),
                                          "--config", str(_write(tmp / "c.toml", "treshold = 3\n"))],
                        "invalid setting treshold"),
    "missing config file": (lambda tmp, url: [str(_jsonl(tmp / "s.jsonl", GOOD)), "--config", str(tmp / "no.toml")],
                            "config file not found"),
}


def _touch(path: Path) -> Path:
    path.touch()
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("no parquet here")
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), path)
    return path


SLOW = ("instruction over the context", "unknown model string", "missing API key", "unreachable endpoint",
        "context too small for any prompt")


@dataclass
class Run:
    done: subprocess.CompletedProcess[str]
    tmp: Path
    requests: int


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Run]]]:
    """Every case runs in its own subprocess and tmp dir; two at a time, the slow ones (litellm's 5-10 s
    import) first, so the module takes about half the time on two cores. Each test then checks its own case."""
    with FakeLLMServer() as server, ThreadPoolExecutor(max_workers=2) as pool:
        order = [*SLOW, *(c for c in CASES if c not in SLOW)]
        futures = {case: pool.submit(_run_case, case, tmp_path_factory.mktemp("cli"), server) for case in order}
        yield futures
        for future in futures.values():
            future.cancel()


def _run_case(case: str, tmp: Path, server: FakeLLMServer) -> Run:
    make, _ = CASES[case]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    env |= {"CODECLM_HOME": str(tmp / "home"), "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "prefect" / "storage")}
    args = [CODECLM, "generate", *make(tmp, server.url), "--out", str(tmp / "out")]
    if "--strong" not in args and "--config" not in args:
        args += ["--strong", "openai/fake-strong", "--target", "openai/fake-target"]
    before = len(server.requests)
    done = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    return Run(done, tmp, len(server.requests) - before)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_error_line_and_publishes_nothing(case: str, runs: dict[str, Future[Run]]) -> None:
    run = runs[case].result()
    done, tmp = run.done, run.tmp
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert CASES[case][1] in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp / "out").exists() and not list(tmp.glob(".out*"))  # nor a staging copy beside it
    assert not (tmp / "home" / "work").exists()  # no step ran
    assert _flow_runs(tmp / "prefect" / "prefect.db") == 0  # no Prefect run was started
    assert run.requests == 0  # no LLM call was made


def _flow_runs(db: Path) -> int:
    """Flow runs recorded in a Prefect database (0 when the temporary server never got as far as making one)."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return conn.execute("SELECT count(*) FROM flow_run").fetchone()[0] if "flow_run" in tables else 0


def test_a_prefect_api_gone_mid_run_is_one_line() -> None:
    """What Prefect raises when its server stays away longer than its client retries (a tag-concurrency slot
    it cannot acquire, from a refused connection to the API) ends the run with one line, not a traceback."""
    import httpx
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from codeclm.ops.prefect_api import api_lost

    api = "http://127.0.0.1:4299/api"
    refused = httpx.ConnectError("All connection attempts failed",
                                 request=httpx.Request("POST", f"{api}/v2/concurrency_limits/increment"))
    try:
        try:
            raise refused
        except httpx.ConnectError as exc:
            raise ConcurrencySlotAcquisitionError("Unable to acquire concurrency slots on ['tag:codeclm']") from exc
    except ConcurrencySlotAcquisitionError as exc:
        wrapped = exc
    with temporary_settings({PREFECT_API_URL: api}):
        line = api_lost(wrapped)
        assert line is not None and line.startswith(f"the Prefect API at {api} stopped answering (ConnectError)")
        assert "run the same command again" in line
        llm = httpx.ConnectError("refused", request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"))
        assert api_lost(llm) is None and api_lost(ValueError("x")) is None  # not the Prefect API: as before


def test_the_demo_says_in_one_line_why_a_shortfall_or_failed_judgements_are_expected() -> None:
    from codeclm.cli import _embedded_note
    from codeclm.settings import Settings

    embedded = Settings()
    note = _embedded_note(embedded, shortfall=2, failed=1)
    assert note is not None and "\n" not in note
    assert note.startswith("note: 2 pairs short of the budget and 1 questions not judged are expected on the embedded")
    assert _embedded_note(embedded, shortfall=0, failed=0) is None
    assert _embedded_note(Settings.load(None, judge="openai/gpt-4o-mini"), shortfall=2, failed=1) is None


@pytest.mark.parametrize("command", ["generate", "run", "evaluate", "refresh"])
def test_retry_failed_is_an_option_of_every_command_that_calls_models_again(
        command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--retry-failed` reaches the settings (`retry_failed`), which the gateway reads."""
    from typer.testing import CliRunner

    import codeclm.cli as cli

    seen: list[bool] = []

    def stop_here(config: object, **overrides: object) -> None:
        seen.append(overrides.get("retry_failed") is True)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_settings", stop_here)
    args = {"generate": ["s.jsonl", "--out", "o"], "run": ["s.jsonl", "--out", "o"],
            "evaluate": ["--benchmark", "b.jsonl", "--out", "o"], "refresh": ["seeds", "--root", "r"]}[command]
    CliRunner().invoke(cli.app, [command, *args, "--retry-failed"])
    CliRunner().invoke(cli.app, [command, *args])
    assert seen == [True, False]
