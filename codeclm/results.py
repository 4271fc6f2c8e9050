"""What each flow returns: typed results the CLI, the refresh flow and callers read by attribute. The files a
flow publishes (manifest.json, summary.json, ...) keep their own schemas; these mirror what they summarize."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from codeclm.eval.eval_records import LeaderboardRow
from codeclm.eval.judge_check import JudgeCheck
from codeclm.eval.loop import LoopRow
from codeclm.eval.protocol import EvalOn, ProtocolRow
from codeclm.train.finetune import FinetuneResult


class Budget(BaseModel):
    """Pairs wanted and published; a shortfall names the stated limit that ended the run."""

    wanted: int
    published: int
    shortfall: int
    limit: str | None
    topup_passes: int = 0


class DatasetResult(BaseModel):
    """A published dataset: which method made it, where, how many training pairs against the budget, counts per
    stage, call stats and their totals."""

    out: str
    method: str
    train: int
    budget: Budget
    counts: dict[str, Any]
    stages: list[dict[str, Any]]
    totals: dict[str, Any]


class GenerateResult(DatasetResult):
    """`generate`: the dataset, and the adaptive concurrency seen per endpoint; `reused` when `out` already held
    this very run (same seeds, settings, recipe, no failed call), so nothing was called or published now."""

    concurrency: list[dict[str, Any]]
    reused: bool = False


class BaselineResult(DatasetResult):
    """`baseline`: the dataset of one baseline method (or a Table 3 ablation)."""


class EvaluateResult(BaseModel):
    """`evaluate`: the report folder and the leaderboard."""

    out: str
    results: list[LeaderboardRow]


class CRRDelta(BaseModel):
    """CRR of one benchmark x target spec in a new version, and its change from the previous version."""

    benchmark: str
    target_spec: str
    target: str
    crr: float
    previous_version: str | None
    previous_crr: float | None
    delta_pp: float | None


class RefreshResult(BaseModel):
    """`refresh`: the version made (`published`), or why none was (`slot-done`, `no-new-seeds`)."""

    status: Literal["published", "slot-done", "no-new-seeds"]
    version: str | None
    previous: str | None
    slot: str
    root: str
    new_seeds: int = 0
    train: int | None = None
    totals: dict[str, Any] | None = None
    eval: list[dict[str, Any]] = []
    crr_delta: list[CRRDelta] = []


class RunResult(BaseModel):
    """What `codeclm run` made: the dataset summary, the tuned model (None when training is off), the CRR
    leaderboard rows and the loop's paired comparison per benchmark."""

    out: str
    dataset: GenerateResult
    data_sha: str
    model: FinetuneResult | None
    evaluation: list[LeaderboardRow]
    loop: list[LoopRow]
    report: str


class MethodResult(BaseModel):
    """One method on one benchmark: its published dataset and the target tuned on it."""

    benchmark: str
    method: str
    dataset: str
    pairs: int
    shortfall: int
    eval_overlap: int = 0  # pairs the leak guard rejected (they repeat an evaluation question)
    model: FinetuneResult


class ProtocolResult(BaseModel):
    """`protocol`: the experiment folder, Table 1's rows, every method's dataset and model, the report."""

    out: str
    eval_on: EvalOn
    rows: list[ProtocolRow]
    methods: list[MethodResult]
    report: str
    judge_check: JudgeCheck | None = None
    empty: list[dict[str, str]] = []  # methods that published no pair: benchmark, method, reason
