"""Rows the baseline steps write next to the shared ones (`codeclm.records`); schemas derived the same way."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from codeclm.records import Record

BaselineMethod = Literal["self_instruct", "evol_instruct", "wizardlm_plus", "alpagasus"]
METHODS: tuple[str, ...] = ("self_instruct", "evol_instruct", "wizardlm_plus", "alpagasus")
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
    """Alpagasus: the strong model's 1-5 rating of one (instruction, answer) pair."""

    table: ClassVar[str] = "ratings"
    pair_id: str
    instruction_id: str
    rating: float
    kept: bool
