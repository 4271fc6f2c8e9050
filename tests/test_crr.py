"""CRR arithmetic: the paper's published numbers, the two position-bias rules, bootstrap CI and summary."""

import itertools

import pytest

from codeclm.eval.crr import CRRSummary, bootstrap_ci, crr, order_winner, outcome, position_flipped, summarize

# Table 5 (Evol-Instruct, 218 questions): method -> (7B W/T/L, 7B CRR, 13B W/T/L, 13B CRR)
TABLE_5 = {
    "Self-Instruct": ((17, 140, 61), 72.02, (29, 136, 53), 75.69),
    "Alpagasus": ((17, 147, 54), 75.23, (26, 148, 44), 79.82),
    "Tree-Instruct": ((23, 141, 54), 75.23, (26, 154, 38), 82.57),
    "WizardLM": ((19, 143, 56), 74.31, (30, 149, 39), 82.11),
    "WizardLM+": ((19, 146, 53), 75.69, (31, 153, 34), 84.40),
    "CodecLM": ((29, 145, 44), 79.82, (35, 154, 29), 86.70),
}


@pytest.mark.parametrize("method", list(TABLE_5))
def test_table_5_crr_from_counts(method: str) -> None:
    counts_7b, crr_7b, counts_13b, crr_13b = TABLE_5[method]
    assert sum(counts_7b) == sum(counts_13b) == 218
    assert round(crr(*counts_7b), 2) == crr_7b
    assert round(crr(*counts_13b), 2) == crr_13b


def test_table_1_vicuna_and_other_denominators() -> None:
    assert crr(0, 71, 9) == 88.75  # CodecLM, LLaMA-7B, Vicuna: 71 of 80 recovered
    assert round(crr(10, 124, 46), 2) == 74.44  # Koala: 134/180
    assert round(crr(20, 177, 55), 2) == 78.17  # Self-Instruct: 197/252


def test_crr_counts_ties_like_wins() -> None:
    assert crr(10, 0, 0) == crr(0, 10, 0) == 100.0
    assert crr(0, 0, 7) == 0.0


@pytest.mark.parametrize("counts", [(0, 0, 0), (-1, 2, 3)])
def test_crr_rejects_empty_or_negative(counts: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        crr(*counts)


# --- position-bias rules -------------------------------------------------------------------------------

# (target, strong) scores that make one order a target win, a draw or a strong win
ORDER_SCORES = {"target": (8.0, 6.0), "draw": (7.0, 7.0), "strong": (5.0, 9.0)}

CODECLM = {
    ("target", "target"): "win",
    ("strong", "strong"): "loss",
    ("target", "draw"): "tie",
    ("draw", "target"): "tie",
    ("strong", "draw"): "tie",
    ("draw", "strong"): "tie",
    ("draw", "draw"): "tie",
    ("target", "strong"): "tie",
    ("strong", "target"): "tie",
}
ALPAGASUS = {
    ("target", "target"): "win",
    ("strong", "strong"): "loss",
    ("target", "draw"): "win",
    ("draw", "target"): "win",
    ("strong", "draw"): "loss",
    ("draw", "strong"): "loss",
    ("draw", "draw"): "tie",
    ("target", "strong"): "tie",
    ("strong", "target"): "tie",
}


def _verdict(winner_a: str, winner_b: str, rule: str) -> str:
    target_a, strong_a = ORDER_SCORES[winner_a]
    target_b, strong_b = ORDER_SCORES[winner_b]
    return outcome(target_a, strong_a, target_b, strong_b, rule=rule)  # type: ignore[arg-type]


def test_order_winner() -> None:
    assert [order_winner(*scores) for scores in ORDER_SCORES.values()] == ["target", "draw", "strong"]


@pytest.mark.parametrize(("winner_a", "winner_b"), list(itertools.product(ORDER_SCORES, repeat=2)))
def test_rules_on_all_nine_order_combinations(winner_a: str, winner_b: str) -> None:
    assert _verdict(winner_a, winner_b, "codeclm") == CODECLM[winner_a, winner_b]
    assert _verdict(winner_a, winner_b, "alpagasus") == ALPAGASUS[winner_a, winner_b]


def test_rules_differ_exactly_on_one_decisive_result_plus_a_draw() -> None:
    differ = {
        (a, b)
        for a, b in itertools.product(ORDER_SCORES, repeat=2)
        if _verdict(a, b, "codeclm") != _verdict(a, b, "alpagasus")
    }
    assert differ == {("target", "draw"), ("draw", "target"), ("strong", "draw"), ("draw", "strong")}


def test_codeclm_rule_is_the_default() -> None:
    assert outcome(8, 6, 7, 7) == "tie"
    assert outcome(8, 6, 7, 7, rule="alpagasus") == "win"


def test_outcome_uses_the_swapped_order_correctly() -> None:
    # each order's scores are compared as (target, strong), whichever was shown first
    assert outcome(target_first=9, strong_second=3, target_second=8, strong_first=4) == "win"
    assert outcome(target_first=3, strong_second=9, target_second=2, strong_first=10) == "loss"


def test_unknown_rule() -> None:
    with pytest.raises(ValueError):
        outcome(8, 6, 8, 6, rule="majority")  # type: ignore[arg-type]


@pytest.mark.parametrize(("winner_a", "winner_b"), list(itertools.product(ORDER_SCORES, repeat=2)))
def test_position_flipped(winner_a: str, winner_b: str) -> None:
    flipped = position_flipped(*ORDER_SCORES[winner_a], *ORDER_SCORES[winner_b])
    assert flipped == (winner_a != winner_b)


# --- bootstrap and summary -----------------------------------------------------------------------------


def _outcomes(wins: int, ties: int, losses: int) -> list[str]:
    return ["win"] * wins + ["tie"] * ties + ["loss"] * losses


def test_bootstrap_contains_point_estimate_and_is_deterministic() -> None:
    outcomes = _outcomes(29, 145, 44)
    low, high = bootstrap_ci(outcomes, seed=7)
    assert low < crr(29, 145, 44) < high
    assert low > 70.0 and high < 90.0
    assert bootstrap_ci(outcomes, seed=7) == (low, high)
    assert len({bootstrap_ci(outcomes, seed=seed, n_resamples=200) for seed in range(10)}) > 1


def test_bootstrap_wider_at_lower_level() -> None:
    outcomes = _outcomes(17, 140, 61)
    low_95, high_95 = bootstrap_ci(outcomes)
    low_50, high_50 = bootstrap_ci(outcomes, level=0.5)
    assert low_95 <= low_50 < high_50 <= high_95


@pytest.mark.parametrize(("verdict", "value"), [("win", 100.0), ("tie", 100.0), ("loss", 0.0)])
def test_bootstrap_degenerate_when_all_outcomes_equal(verdict: str, value: float) -> None:
    assert bootstrap_ci([verdict] * 50, n_resamples=200) == (value, value)


@pytest.mark.parametrize(
    ("outcomes", "kwargs"),
    [([], {}), (["win", "draw"], {}), (["win"], {"n_resamples": 0}), (["win"], {"level": 1.0})],
)
def test_bootstrap_rejects_bad_input(outcomes: list[str], kwargs: dict) -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(outcomes, **kwargs)


def test_summarize() -> None:
    outcomes = ["win", "tie", "tie", "loss"]
    summary = summarize(outcomes, [True, False, False, True], [100, 200, 300, 400], [50, 50, 50, 50])
    assert isinstance(summary, CRRSummary)
    assert (summary.wins, summary.ties, summary.losses, summary.total) == (1, 2, 1, 4)
    assert summary.crr == 75.0
    assert summary.ci_low <= summary.crr <= summary.ci_high
    assert (summary.ci_low, summary.ci_high) == bootstrap_ci(outcomes)
    assert summary.flip_rate == 0.5
    assert (summary.mean_target_length, summary.mean_strong_length) == (250.0, 50.0)


def test_summarize_flip_rate_from_scores() -> None:
    judged = [(8, 6, 8, 6), (8, 6, 6, 8), (7, 7, 7, 7), (5, 9, 7, 7)]
    flips = [position_flipped(*scores) for scores in judged]
    outcomes = [outcome(*scores) for scores in judged]
    summary = summarize(outcomes, flips, [1.0] * 4, [2.0] * 4)
    assert outcomes == ["win", "tie", "tie", "tie"]
    assert summary.flip_rate == 0.5
    assert summary.crr == 100.0


@pytest.mark.parametrize(
    ("outcomes", "flips"), [([], []), (["win", "tie"], [False]), (["win", "maybe"], [False, False])]
)
def test_summarize_rejects_bad_input(outcomes: list[str], flips: list[bool]) -> None:
    with pytest.raises(ValueError):
        summarize(outcomes, flips, [1.0] * len(outcomes), [1.0] * len(outcomes))


def test_paired_difference_cancels_question_difficulty() -> None:
    from codeclm.eval.crr import paired_difference

    # tuned recovers 3 more of 40 questions and loses none it had: every resample moves the same way
    base = ["loss"] * 20 + ["tie"] * 20
    tuned = ["win"] * 3 + ["loss"] * 17 + ["tie"] * 20
    paired = paired_difference(base, tuned)
    assert (paired.questions, paired.crr_a, paired.crr_b) == (40, 50.0, pytest.approx(57.5))
    assert paired.delta == pytest.approx(7.5) and paired.ci_low <= paired.delta <= paired.ci_high
    # unpaired, the two CRR intervals overlap widely; paired, the difference interval excludes zero
    from codeclm.eval.crr import bootstrap_ci

    assert bootstrap_ci(tuned)[0] < bootstrap_ci(base)[1]
    assert paired.ci_low >= 0.0 and paired.ci_high > 0.0
    assert paired_difference(base, tuned) == paired  # deterministic


def test_paired_difference_of_a_model_with_itself_is_zero() -> None:
    from codeclm.eval.crr import paired_difference

    same = ["win", "loss", "tie", "loss"]
    assert paired_difference(same, same).model_dump() == {"questions": 4, "crr_a": 50.0, "crr_b": 50.0, "delta": 0.0,
                                                          "ci_low": 0.0, "ci_high": 0.0}
    with pytest.raises(ValueError, match="one verdict per question"):
        paired_difference(same, same[:2])
