"""The terminal leaderboard stays readable at 80 columns: benchmark names, CRR and intervals never fold."""

from __future__ import annotations

import io

from rich.console import Console

from codeclm.cli import leaderboard_table
from codeclm.results import LeaderboardRow


def _row(benchmark: str, target: str) -> LeaderboardRow:
    return LeaderboardRow(benchmark=benchmark, target=target, strong="openai/gpt-4o", judge="openai/gpt-4o-mini",
                          wins=12, ties=103, losses=45, failures=0, total=160, crr=71.88, ci_low=64.4, ci_high=100.0,
                          flip_rate=0.37, mean_target_length=900.0, mean_strong_length=1200.0, judge_is_strong=False)


def test_leaderboard_fits_80_columns() -> None:
    rows = [_row("eval_questions", "openai/smollm2-135m-instruct"),
            _row("evol-instruct", "hosted_vllm/meta-llama/Llama-3.1-8B-Instruct-codeclm-v0003")]
    buffer = io.StringIO()
    Console(file=buffer, width=80, color_system=None).print(leaderboard_table(rows))
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    for cells in (("eval_questions", "12/103/45", "71.88", "64.4-100.0", "37%"), ("evol-instruct", "71.88")):
        assert any(all(cell in line for cell in cells) for line in lines), lines
    joined = "".join(line[15:43].strip() for line in lines)  # a long model string folds within its column
    assert "openai/smollm2-135m-instruct" in joined
