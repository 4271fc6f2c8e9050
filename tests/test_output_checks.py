"""Output locations are checked before the first call: a file, a path under a file, a folder that cannot be
written, or a folder of someone else's files stop every command with one line, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from codeclm.checks import check_output, check_run_output
from codeclm.errors import ConfigError
from codeclm.testing.fake_llm import FakeLLMServer

ROOT = Path(__file__).resolve().parents[1]
CODECLM = str(Path(sys.executable).with_name("codeclm"))


def _file(tmp: Path) -> Path:
    (tmp / "taken").write_text("a file the user keeps")
    return tmp / "taken"


def _under_file(tmp: Path) -> Path:
    return _file(tmp) / "out"


def _unwritable(tmp: Path) -> Path:
    """Root ignores permission bits, so as root use sysfs, which refuses new folders to everyone."""
    if os.geteuid() == 0:
        return Path("/sys/codeclm-test-out")
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "out"


def _foreign(tmp: Path) -> Path:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("not codeclm's")
    return tmp / "mine"


LOCATIONS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "existing file": (_file, "is an existing file"),
    "under a file": (_under_file, "is a file, so nothing can be written under it"),
    "unwritable folder": (_unwritable, "cannot write in"),
    "folder of other files": (_foreign, "holds files that codeclm did not write"),
}


@pytest.mark.parametrize("case", list(LOCATIONS))
def test_check_output_refuses(case: str, tmp_path: Path) -> None:
    make, message = LOCATIONS[case]
    with pytest.raises(ConfigError, match=message):
        check_output(make(tmp_path))


def test_check_output_accepts_new_empty_and_earlier_outputs(tmp_path: Path) -> None:
    assert check_output(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # the check writes nothing
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "manifest.json").write_text("{}")
    check_output(tmp_path / "earlier")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "empty"]  # no probe left behind


def test_run_output_checks_its_two_parts(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dataset").write_text("a file where the dataset goes")
    with pytest.raises(ConfigError, match="dataset: is an existing file"):
        check_run_output(tmp_path / "out")


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


def _command(name: str, out: Path) -> list[str]:
    models = ["--strong", "openai/fake-strong", "--target", "openai/fake-target"]
    seeds = str(ROOT / "data" / "seeds.jsonl")
    return {
        "generate": ["generate", seeds, "--out", str(out), *models],
        "evaluate": ["evaluate", "-b", str(ROOT / "data" / "eval_questions.jsonl"), "--out", str(out), *models],
        "run": ["run", seeds, "--out", str(out), *models, "--judge", "openai/fake-strong"],
        "refresh": ["refresh", str(ROOT / "data"), "--root", str(out)],
    }[name]


@pytest.mark.parametrize("case", ["existing file", "under a file", "unwritable folder"])
@pytest.mark.parametrize("command", ["generate", "evaluate", "run", "refresh"])
def test_every_command_checks_its_output_first(command: str, case: str, tmp_path: Path,
                                               llm: FakeLLMServer) -> None:
    make, message = LOCATIONS[case]
    out = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    env |= {"CODECLM_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
            "OPENAI_API_BASE": llm.url, "OPENAI_API_KEY": "sk-test"}
    done = subprocess.run([CODECLM, *_command(command, out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    # nothing written: no output, no work or call cache, no Prefect database (Prefect's logging setup may make
    # its empty home folder)
    assert [p for p in sorted(tmp_path.rglob("*")) if p.parts[:len(tmp_path.parts) + 1] != (*tmp_path.parts, "prefect")
            ] == before
    assert not (tmp_path / "prefect" / "prefect.db").exists()
    assert llm.requests == []
