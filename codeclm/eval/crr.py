"""Capacity Recovery Ratio (paper §5.3, Table 1): how often the target model is at least as good as the
strong model, judged twice with the answer order swapped to cancel the judge's position bias.

Two rules turn the two per-order results into one verdict. The paper's ("a response is considered better
only if it wins twice") is the default; Alpagasus' rule counts one win plus one draw as a win, and so gives
a different CRR. They differ exactly on (win, draw) and (loss, draw), in either order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel

Verdict = Literal["win", "tie", "loss"]
Rule = Literal["codeclm", "alpagasus"]
Winner = Literal["target", "strong", "draw"]

VERDICTS: tuple[Verdict, ...] = ("win", "tie", "loss")


def order_winner(target: float, strong: float) -> Winner:
    """The winner of one judged order: the higher score; equal scores are a draw."""
    if target > strong:
        return "target"
    if strong > target:
        return "strong"
    return "draw"


def outcome(target_first: float, strong_second: float, target_second: float, strong_first: float,
            rule: Rule = "codeclm") -> Verdict:
    """The target's verdict for one question from its two judged orders, named as in codeclm.llm.pairwise: order
    target_first (target_first vs strong_second), then order strong_first (target_second vs strong_first)."""
    winners = (order_winner(target_first, strong_second), order_winner(target_second, strong_first))
    target_wins, strong_wins = winners.count("target"), winners.count("strong")
    if rule == "codeclm":
        if target_wins == 2:
            return "win"
        return "loss" if strong_wins == 2 else "tie"
    if rule == "alpagasus":
        if target_wins == strong_wins:
            return "tie"
        return "win" if target_wins > strong_wins else "loss"
    raise ValueError(f"unknown rule {rule!r}; use 'codeclm' or 'alpagasus'")


def position_flipped(target_first: float, strong_second: float, target_second: float, strong_first: float) -> bool:
    """Whether swapping the answer order changed who won: a measure of the judge's position bias."""
    return order_winner(target_first, strong_second) != order_winner(target_second, strong_first)


def crr(wins: int, ties: int, losses: int) -> float:
    """CRR in percent: (wins + ties) / total. Ties count fully, as the strong model is the upper bound."""
    if min(wins, ties, losses) < 0:
        raise ValueError(f"counts must not be negative, got {wins}/{ties}/{losses}")
    total = wins + ties + losses
    if total == 0:
        raise ValueError("CRR needs at least one judged question")
    return 100.0 * (wins + ties) / total


def _recovered(outcomes: Sequence[str]) -> np.ndarray:
    """1.0 for a win or tie, 0.0 for a loss; rejects anything else."""
    unknown = sorted(set(outcomes) - set(VERDICTS))
    if unknown:
        raise ValueError(f"unknown outcomes {unknown}; expected win, tie or loss")
    if not outcomes:
        raise ValueError("CRR needs at least one judged question")
    return np.array([value != "loss" for value in outcomes], dtype=float)


def bootstrap_ci(
    outcomes: Sequence[str], n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of CRR over questions: how much of a CRR gap is benchmark noise."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    recovered = _recovered(outcomes)
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(recovered), size=(n_resamples, len(recovered)))
    rates = 100.0 * recovered[samples].mean(axis=1)
    low, high = np.percentile(rates, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(low), float(high)


class PairedDifference(BaseModel):
    """CRR of two targets on the same questions, and their difference (b − a, percentage points) with a paired
    bootstrap interval: both are resampled with the same questions, so question difficulty cancels out."""

    questions: int
    crr_a: float
    crr_b: float
    delta: float
    ci_low: float
    ci_high: float


def paired_difference(a: Sequence[str], b: Sequence[str], n_resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> PairedDifference:
    """Paired percentile bootstrap of CRR(b) − CRR(a); `a[i]` and `b[i]` are verdicts on the same question."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need one verdict per question for both targets, got {len(a)} and {len(b)}")
    diff = _recovered(b) - _recovered(a)
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(diff), size=(n_resamples, len(diff)))
    deltas = 100.0 * diff[samples].mean(axis=1)
    low, high = np.percentile(deltas, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    crr_a, crr_b = 100.0 * _recovered(a).mean(), 100.0 * _recovered(b).mean()
    return PairedDifference(questions=len(diff), crr_a=crr_a, crr_b=crr_b, delta=crr_b - crr_a, ci_low=float(low),
                            ci_high=float(high))


class CRRSummary(BaseModel):
    """One target-vs-strong evaluation; `flip_rate` is the share of questions whose winner changed with order."""

    wins: int
    ties: int
    losses: int
    total: int
    crr: float
    ci_low: float
    ci_high: float
    flip_rate: float
    mean_target_length: float
    mean_strong_length: float


def summarize(
    outcomes: Sequence[str],
    flips: Sequence[bool],
    target_lengths: Sequence[float],
    strong_lengths: Sequence[float],
) -> CRRSummary:
    """Counts, CRR with its bootstrap interval, flip rate and mean answer lengths (a check on length bias)."""
    sizes = {len(outcomes), len(flips), len(target_lengths), len(strong_lengths)}
    if len(sizes) != 1:
        raise ValueError("outcomes, flips and both length lists must have one entry per question")
    ci_low, ci_high = bootstrap_ci(outcomes)  # first: it rejects empty or unknown outcomes
    wins, ties, losses = (sum(value == verdict for value in outcomes) for verdict in VERDICTS)
    return CRRSummary(
        wins=wins,
        ties=ties,
        losses=losses,
        total=len(outcomes),
        crr=crr(wins, ties, losses),
        ci_low=ci_low,
        ci_high=ci_high,
        flip_rate=sum(flips) / len(flips),
        mean_target_length=float(np.mean(target_lengths)),
        mean_strong_length=float(np.mean(strong_lengths)),
    )
