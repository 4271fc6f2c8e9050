"""Rows the baseline steps write next to the shared ones (`codeclm.records`); schemas derived the same way. Also
what a caller must know before it runs a baseline: the methods, how many seeds each needs by its own recipe, and
whether a folder holds CodecLM basic instructions WizardLM+ can evolve."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from codeclm.errors import ConfigError, DatasetError
from codeclm.records import Candidate, Record

if TYPE_CHECKING:
    from codeclm.settings import Settings

BaselineMethod = Literal["self_instruct", "evol_instruct", "wizardlm_plus", "alpagasus", "tree_instruct"]
METHODS: tuple[str, ...] = ("self_instruct", "evol_instruct", "wizardlm_plus", "alpagasus", "tree_instruct")
MAX_LINEAGES = 6  # Evol-Instruct: chains per root at most, one per evolution method (tasks.evol.METHODS)
ALPAGASUS_RATER = "judge"  # CodecLM A.2: a ChatGPT evaluator "closely following" Alpagasus, not the strong model
# Table 3's ablations: the CodecLM flow with these settings (docs/baselines.md). Nothing is filtered, so the
# budget needs no oversampling; top-up passes replace what failed or repeated.
ABLATIONS: dict[str, dict[str, Any]] = {
    "metadata_only": {"contrastive_filtering": False, "max_rounds": 1, "oversample": 1.0},
    "no_contrastive_filtering": {"contrastive_filtering": False, "oversample": 1.0},
}


class PoolInstruction(Record):
    """An instruction a baseline made: Self-Instruct's bootstrap round, or an evolution's depth and lineage."""

    table: ClassVar[str] = "instructions"
    instruction_id: str
    instruction: str
    method: str
    round: int  # Self-Instruct: bootstrap round; Evol: evolution depth (0 = the root it evolved from)
    parent_id: str | None = None
    root_instruction: str
    evolutions: list[str]  # Evol methods applied from the root, in order; empty for Self-Instruct
    seed_ids: list[str]  # seeds shown in the prompt (Self-Instruct) or the root's seeds (Evol)
    metadata_id: str = ""  # WizardLM+: the metadata of the CodecLM basic instruction it evolved from
    use_case: str = ""
    skills: list[str] = Field(default_factory=list)


BaselineRejectReason = Literal["rouge_overlap", "empty", "unchanged", "prompt_leak", "duplicate", "seed_overlap",
                               "failed_answer", "low_rating", "over_budget", "eval_overlap"]


class BaselineRejected(Record):
    """An instruction or pair a baseline dropped, which step dropped it and why (`detail`: the score or text)."""

    table: ClassVar[str] = "rejected"
    instruction_id: str
    instruction: str
    stage: str
    reason: BaselineRejectReason
    detail: str = ""


class Rating(Record):
    """Alpagasus: the judge's 0-5 accuracy rating of one (instruction, answer) pair, and who rated it."""

    table: ClassVar[str] = "ratings"
    pair_id: str
    instruction_id: str
    rating: float
    kept: bool
    model: str = ""


def lineages(roots: int, want: int, rounds: int) -> int:
    """Evol-Instruct chains per root: the smallest of 1..6 whose roots x chains x rounds evolutions reach `want`
    (tasks.evol states the rule); 6 at most, one per evolution method."""
    if roots == 0:
        return 1
    return max(1, min(MAX_LINEAGES, math.ceil(want / (roots * rounds))))


def evolution_calls(roots: int, settings: Settings) -> int:
    """Evolution calls Evol-Instruct or WizardLM+ makes from `roots` seeds or basic instructions when none is
    eliminated: every root, its lineages, every round (a plan's upper bound; eliminations end lineages early)."""
    cfg = settings.baselines
    want = math.ceil(settings.budget * cfg.evol_oversample)
    return roots * lineages(roots, want, cfg.evol_rounds) * cfg.evol_rounds


def baseline_roles(method: str) -> tuple[str, ...]:
    """The roles a baseline calls: the strong model writes and answers; Alpagasus' rater is the judge."""
    return ("strong", ALPAGASUS_RATER) if method == "alpagasus" else ("strong",)


def seeds_needed(method: str, settings: Settings) -> int | None:
    """How many seeds `method` needs to reach the budget by its own recipe; None when any number works
    (Self-Instruct and Alpagasus show seeds only as demonstrations; WizardLM+ evolves CodecLM's basic
    instructions; CodecLM and Table 3's ablations take the benchmark's seeds).

    Evol-Instruct evolves every seed once per round (one lineage), so it needs budget x evol_oversample /
    evol_rounds seeds; Tree-Instruct rewrites each seed once, so it needs one seed per pair."""
    cfg = settings.baselines
    if method == "evol_instruct":
        return math.ceil(settings.budget * cfg.evol_oversample / cfg.evol_rounds)
    if method == "tree_instruct":
        return settings.budget
    if method in (*METHODS, *ABLATIONS, "codeclm"):
        return None
    raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(('codeclm', *METHODS, *ABLATIONS))}")


def basic_instructions_file(folder: Path | str) -> Path:
    """The candidates table of a published CodecLM dataset (what `codeclm generate` writes), whose round-1 rows
    are its basic instructions; anything else stops with one line naming what is missing."""
    root = Path(folder)
    manifest, candidates = root / "manifest.json", root / "stages" / "candidates.parquet"
    what = f"--basic {root}: not a CodecLM dataset folder (what `codeclm generate` writes)"
    try:
        method = json.loads(manifest.read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        raise DatasetError(f"{what}: no readable manifest.json") from None
    if method != "codeclm":
        raise DatasetError(f"{what}: its manifest says method {method!r}, not 'codeclm'")
    if not candidates.is_file():
        raise DatasetError(f"{what}: stages/candidates.parquet is missing")
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(candidates)
        rounds = set(pq.read_table(candidates, columns=["round"]).column("round").to_pylist())
    except Exception as exc:  # any unreadable Parquet is the same one-line user error
        raise DatasetError(f"{what}: stages/candidates.parquet is unreadable ({type(exc).__name__})") from None
    if not schema.remove_metadata().equals(Candidate.arrow_schema()):
        raise DatasetError(f"{what}: stages/candidates.parquet does not hold CodecLM candidates")
    if 1 not in rounds:
        raise DatasetError(f"{what}: stages/candidates.parquet holds no basic (round 1) instruction")
    return candidates
