"""CRR evaluation, step 2 (paper §5.3, Fig. 12): the judge scores target and strong answers in both orders.

Both orders and their columns follow codeclm.llm.pairwise (order `strong_first`, then `target_first`; scores named
by role and shown position), as generation scoring does. A question whose answer or judgement failed (the
gateway already retried unparseable output) is kept as `failed`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from codeclm.errors import ParseError
from codeclm.eval.crr import Rule, outcome, position_flipped
from codeclm.eval.eval_records import EvalAnswer, EvalQuestion, EvalQuestionResult
from codeclm.llm.gateway import Call, Reply, Result
from codeclm.llm.pairwise import ORDERS, ScoresOnScale, pair_calls, pair_scores
from codeclm.llm.parsing import parse_two_scores
from codeclm.llm.prompts import load_prompt
from codeclm.settings import StageSettings
from tasks._base import Outputs, Ref, Step, codec_task, read
from tasks.answer import item_id

FAILURE_TEXT = 300


class Verdict(ScoresOnScale):
    """The judge's reply: Assistant 1's and Assistant 2's scores, then why."""

    explanation: str = ""


_JSON_SCORES = re.compile(r'"score_1"\s*:\s*(\d+(?:\.\d+)?)\s*,\s*"score_2"\s*:\s*(\d+(?:\.\d+)?)')


def verdict_from_text(text: str) -> Verdict:
    """Fig. 12 text format: the scores on the first line, the explanation on the lines after it. Also reads the
    scores of a JSON verdict cut short in its explanation (scores come first, so they are complete)."""
    try:
        first, second = parse_two_scores(text)
    except ParseError:
        found = _JSON_SCORES.search(text)
        if found is None:
            raise
        return Verdict(score_1=float(found[1]), score_2=float(found[2]))
    _, _, explanation = text.strip().partition("\n")
    return Verdict(score_1=first, score_2=second, explanation=explanation.strip())


def verdict_calls(question: str, item: str, target: str, strong: str, structured: bool, template: str = "judge"
                  ) -> list[Call]:
    """Both orders (codeclm.llm.pairwise.ORDERS) at the judge role's own temperature, with the prompt file
    `template` (setting `judge_template`). A template without a JSON form (the paper's Fig. 12) is answered in
    plain text whatever the role's `output_mode` says: no schema is sent, the first line is read."""
    has_json = "format:json" in load_prompt(template).sections
    return pair_calls(template, question=question, strong=strong, target=target, item_id=item, role="judge",
                      stage="judge", structured=structured and has_json, output=Verdict,
                      text_parser=verdict_from_text,  # the scores come first; a cut explanation is fine
                      reply=Reply.STRUCTURED_CUT_OK if has_json else Reply.FREE_TEXT)


def question_result(question: EvalQuestion, target: EvalAnswer, strong: EvalAnswer, orders: Sequence[Result],
                    settings: StageSettings, rule: Rule) -> EvalQuestionResult:
    """The verdict of one question, or `failed` with the reason when an answer or a judgement is missing."""
    row = EvalQuestionResult(benchmark=question.benchmark, question_id=question.question_id, prompt=question.prompt,
                             target_model=target.model, strong_model=strong.model, judge_model=settings.judge.model,
                             target_answer=target.text, strong_answer=strong.text, outcome="failed")
    for answer in (target, strong):
        if answer.text is None:
            row.failure = f"{answer.role} answer failed: {(answer.failure or '')[:FAILURE_TEXT]}"
            return row
    for order, result in zip(ORDERS, orders, strict=True):
        if not result.ok:
            row.failure = f"judge, order {order}: {result.error_type}: {result.message[:FAILURE_TEXT]}"
            row.judge_output = result.text
            return row
    strong_first, target_first = orders[0].value, orders[1].value
    scores = pair_scores(strong_first, target_first)
    ordered = (scores.target_score_first, scores.strong_score_second, scores.target_score_second,
               scores.strong_score_first)
    return row.model_copy(update={**scores.columns(), "explanation_strong_first": strong_first.explanation,
                                  "explanation_target_first": target_first.explanation,
                                  "outcome": outcome(*ordered, rule), "flipped": position_flipped(*ordered)})


@codec_task("judge", run_name="{name} · {batch} · {target_model}", tags=["eval", "role:judge"])
def judge(questions: Ref, strong_answers: Ref, target_answers: Ref, settings: StageSettings, target_model: str,
          rule: Rule, batch: str) -> Outputs:
    """Judge every question of a batch that has both answers; every question gets exactly one result row.
    `settings` is the run's own (not a per-target copy), so all targets share the judge's concurrency limit;
    `target_model` names the run in the UI."""
    step = Step("judge", batch, settings, questions=questions["sha"], strong=strong_answers["sha"],
                target=target_answers["sha"], target_model=target_model, rule=rule)
    if (done := step.done()) is not None:
        return done
    rows = read(questions, EvalQuestion)
    strong = {(a.benchmark, a.question_id): a for a in read(strong_answers, EvalAnswer)}
    target = {(a.benchmark, a.question_id): a for a in read(target_answers, EvalAnswer)}
    pairs = [(q, target[_key(q)], strong[_key(q)]) for q in rows]
    judged = [(q, t, s) for q, t, s in pairs if t.text is not None and s.text is not None]
    structured = step.structured("judge")
    results = step.call([call for q, t, s in judged for call in verdict_calls(
        q.prompt, item_id(q.benchmark, q.question_id), t.text or "", s.text or "", structured,
        settings.judge_template)])
    orders = {_key(q): results[2 * i:2 * i + 2] for i, (q, _, _) in enumerate(judged)}
    step.write("results", [question_result(q, t, s, orders.get(_key(q), []), settings, rule) for q, t, s in pairs],
               EvalQuestionResult)
    return step.finish()


def _key(question: EvalQuestion) -> tuple[str, str]:
    return question.benchmark, question.question_id
