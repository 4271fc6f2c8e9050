"""The judge check (codeclm.eval.judge_check): the strong model answers a few evaluation questions, and the final
judge compares each answer with a worse one in both orders, with its own template and mode. Every call goes
through the gateway like any other, so a rerun (and the evaluation's strong answers to the same questions) is
answered from the call cache."""

from __future__ import annotations

from codeclm.eval.judge_check import JudgeCheckRow, check_pairs
from codeclm.llm.pairwise import ORDERS
from codeclm.settings import StageSettings
from tasks._base import Outputs, Step, codec_task
from tasks.judge import verdict_calls
from tasks.respond import answer_calls


@codec_task("judge_check", run_name="judge check · {label}", tags=["eval", "role:judge"])
def judge_check(questions: list[tuple[str, str]], settings: StageSettings, label: str) -> Outputs:
    """Judge the check pairs built from `questions` (item id, prompt); one row per judged order."""
    step = Step("judge_check", label, settings, questions=questions)
    if (done := step.done()) is not None:
        return done
    answers = step.call(answer_calls(list(questions), "strong", "answer"))
    pairs = check_pairs(questions, [r.value if r.ok else None for r in answers])
    structured = step.structured("judge")
    results = step.call([call for p in pairs for call in verdict_calls(
        p.question, p.pair_id, p.degraded, p.intact, structured, settings.judge_template)]) if pairs else []
    rows = []
    for i, pair in enumerate(pairs):
        for order, result in zip(ORDERS, results[2 * i:2 * i + 2], strict=True):
            if not result.ok:
                rows.append(JudgeCheckRow(pair_id=pair.pair_id, kind=pair.kind, order=order,
                                          failure=f"{result.error_type}: {result.message[:300]}"))
                continue
            # order strong_first shows the intact answer as Assistant 1 (verdict_calls' `strong`)
            one, two = result.value.score_1, result.value.score_2
            intact, degraded = (one, two) if order == "strong_first" else (two, one)
            rows.append(JudgeCheckRow(pair_id=pair.pair_id, kind=pair.kind, order=order, intact_score=intact,
                                      degraded_score=degraded, prefers_intact=intact > degraded))
    step.write("checks", rows, JudgeCheckRow)
    return step.finish()
