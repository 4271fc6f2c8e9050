"""ROUGE-L on word tokens (Lin 2004), as Self-Instruct uses it to keep its instruction pool diverse.

F-measure with beta = 1 over the longest common subsequence: F = 2 * LCS / (len(a) + len(b)). Tokens are
lower-cased runs of letters and digits (rouge_score's default tokenizer, no stemming, as in Self-Instruct).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(a: str | list[str], b: str | list[str]) -> float:
    """ROUGE-L F-measure of two texts (or token lists); 0 when either is empty."""
    ta = tokens(a) if isinstance(a, str) else a
    tb = tokens(b) if isinstance(b, str) else b
    if not ta or not tb:
        return 0.0
    return 2 * lcs_length(ta, tb) / (len(ta) + len(tb))


class RougePool:
    """Texts a new one is compared against; `max_score` skips the quadratic LCS whenever the shared-token count
    (an upper bound on the LCS) already proves the score below the threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._items: list[tuple[list[str], Counter[str]]] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, text: str) -> None:
        toks = tokens(text)
        self._items.append((toks, Counter(toks)))

    def max_score(self, text: str) -> float:
        """The highest ROUGE-L F of `text` against the pool, exact whenever it reaches the threshold; below it,
        the value is a lower bound (enough to decide, cheaper to get)."""
        toks = tokens(text)
        counts = Counter(toks)
        best = 0.0
        for other, other_counts in self._items:
            total = len(toks) + len(other)
            if not total:
                continue
            if 2 * sum((counts & other_counts).values()) / total < self.threshold:
                continue  # cannot reach the threshold: the LCS is at most the shared-token count
            best = max(best, rouge_l(toks, other))
            if best >= self.threshold:
                return best
        return best

    def accepts(self, text: str) -> tuple[bool, float]:
        """Whether `text` is new enough (score below the threshold, and not empty), and its score."""
        score = self.max_score(text)
        return bool(tokens(text)) and score < self.threshold, score


LEAK_ROUGE = 0.7  # the paper's own similarity filter (Self-Instruct's ROUGE-L threshold)


def normalised(text: str) -> str:
    """The text as its lower-cased word tokens joined by one space: what the exact-match leak test compares."""
    return " ".join(tokens(text))


class EvalOverlap:
    """The evaluation questions a training instruction must not repeat: a normalised exact match, or ROUGE-L
    >= 0.7 with any of them (light rewrites of a test question pass an exact test, rarely this one)."""

    def __init__(self, questions: Iterable[str], threshold: float = LEAK_ROUGE) -> None:
        self._exact = {normalised(q) for q in questions}
        self._exact.discard("")
        self._pool = RougePool(threshold)
        for q in self._exact:
            self._pool.add(q)

    def __len__(self) -> int:
        return len(self._exact)

    def match(self, instruction: str) -> str | None:
        """Why `instruction` overlaps the evaluation questions ('exact' or 'rouge-l 0.83'), or None."""
        text = normalised(instruction)
        if not text:
            return None
        if text in self._exact:
            return "exact"
        score = self._pool.max_score(text)
        return f"rouge-l {score:.2f}" if score >= self._pool.threshold else None
