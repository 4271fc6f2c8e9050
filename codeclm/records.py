"""Every row the pipeline writes, as pydantic models; their Arrow schemas are derived, never hand-written.

Ids are content hashes, so a rerun over the same seeds makes the same ids and hits the same caches.
"""

from __future__ import annotations

import hashlib
import types
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field


def content_id(prefix: str, *parts: object) -> str:
    """A short stable id from content: the same inputs give the same id in every process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:16]
    return f"{prefix}-{digest}"


class Record(BaseModel):
    """Base row: strict fields, and a table name used for file names and messages."""

    model_config = ConfigDict(extra="forbid")
    table: ClassVar[str] = "records"

    @classmethod
    def arrow_schema(cls) -> pa.Schema:
        return pa.schema([_arrow_field(name, f.annotation) for name, f in cls.model_fields.items()])


_SCALARS: dict[Any, pa.DataType] = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def _arrow_field(name: str, annotation: Any) -> pa.Field:
    nullable = False
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(get_args(annotation))
        annotation = args[0]
        origin = get_origin(annotation)
    if origin is Literal:
        annotation = type(get_args(annotation)[0])
    if origin is list:
        (item,) = get_args(annotation)
        return pa.field(name, pa.list_(_SCALARS[item]), nullable=nullable)
    return pa.field(name, _SCALARS[annotation], nullable=nullable)


class Seed(Record):
    """One seed instruction; its id is given by the user or derived from its text."""

    table: ClassVar[str] = "seeds"
    seed_id: str
    instruction: str = Field(min_length=1)


class Metadata(Record):
    """Encoded metadata (paper §4.1): one use case and the skills needed, from a seed or mix-and-match."""

    table: ClassVar[str] = "metadata"
    metadata_id: str
    use_case: str
    skills: list[str]
    origin: Literal["seed", "augmented"]
    seed_ids: list[str]


class RubricSet(Record):
    """Self-Rubrics for one metadata: domain rubrics and the matching actions that make instructions harder."""

    table: ClassVar[str] = "rubrics"
    metadata_id: str
    rubrics: list[str]
    actions: list[str]


class Candidate(Record):
    """An instruction at round k; round 1 is the basic instruction, each later round applied one action."""

    table: ClassVar[str] = "candidates"
    candidate_id: str
    instruction_id: str
    metadata_id: str
    seed_ids: list[str]
    use_case: str
    skills: list[str]
    round: int
    instruction: str
    basic_instruction: str
    actions_applied: list[str]


class Response(Record):
    """One model's answer to a candidate instruction."""

    table: ClassVar[str] = "responses"
    candidate_id: str
    role: Literal["strong", "target"]
    model: str
    text: str


class Judgement(Record):
    """Pairwise scores of the strong and target answers, judged in both orders (codeclm.llm.pairwise)."""

    table: ClassVar[str] = "judgements"
    candidate_id: str
    round: int
    strong_score_first: float  # scores by role and the position the answer was shown in (codeclm.llm.pairwise)
    strong_score_second: float
    target_score_first: float
    target_score_second: float
    strong_mean: float
    target_mean: float
    gap: float


Decision = Literal["keep_strong", "keep_target", "next_round", "reject"]


class FilterDecision(Record):
    """The Contrastive Filtering outcome of one candidate at one round."""

    table: ClassVar[str] = "decisions"
    candidate_id: str
    instruction_id: str
    round: int
    gap: float
    decision: Decision


class TrainingPair(Record):
    """A kept instruction-response pair with its whole lineage, ready for fine-tuning."""

    table: ClassVar[str] = "train"
    pair_id: str
    instruction: str
    response: str
    response_source: Literal["strong", "target"]
    other_response: str
    instruction_id: str
    candidate_id: str
    seed_ids: list[str]
    metadata_id: str
    use_case: str
    skills: list[str]
    basic_instruction: str
    actions_applied: list[str]
    round: int
    strong_model: str
    target_model: str
    strong_score_first: float  # scores by role and the position the answer was shown in (codeclm.llm.pairwise)
    strong_score_second: float
    target_score_first: float
    target_score_second: float
    gap: float
    decision: Decision


# target_better: the target's answer won by more than theta in the last round, but keep_target_when_better is off;
# eval_overlap: the instruction repeats an evaluation question (the leak guard, setting `eval_overlap`)
RejectReason = Literal["below_threshold", "target_better", "over_budget", "seed_overlap", "duplicate",
                       "eval_overlap"]


class RejectedCandidate(Record):
    """A basic instruction's lineage that ended without a training pair, and why."""

    table: ClassVar[str] = "rejected"
    instruction_id: str
    candidate_id: str
    metadata_id: str
    round: int
    instruction: str
    reason: RejectReason
    gap: float | None = None


class FailedCall(Record):
    """An LLM call that failed for good (after retries), with its raw output when there was one."""

    table: ClassVar[str] = "failed_calls"
    stage: str
    item_id: str
    instruction_id: str | None = None
    role: str
    model: str
    error_type: str
    message: str
    attempts: int
    raw_text: str | None = None
    call_key: str


class CallStats(Record):
    """Calls, tokens and cost of one task run, summed into the manifest and the UI table."""

    table: ClassVar[str] = "call_stats"
    stage: str
    batch: str
    calls: int = 0
    cached: int = 0
    failed: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0
    seconds: float = 0.0
    cache_unreadable: int = 0  # corrupt call-cache entries met and treated as misses (the calls were made again)
