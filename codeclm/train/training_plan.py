"""What a training is, once checked: its dataset, its base model and its plan. The trainers (local, remote) take a
plan and nothing else from `codeclm.train.finetune`, so the step and its trainers import downwards only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

EXAMPLE_FILE = "training_example.txt"  # the local trainer's first training sequence, exactly as the model saw it


@dataclass(frozen=True)
class Dataset:
    """The training file of a published dataset and its content hash."""

    path: Path
    sha: str
    pairs: int


@dataclass(frozen=True)
class BaseRef:
    """Where the base model comes from; `identity` is what enters the cache key."""

    name: str
    kind: Literal["gguf", "checkpoint", "hub", "remote"]
    location: str
    identity: str


@dataclass(frozen=True)
class FinetunePlan:
    """Everything checked before training starts."""

    dataset: Dataset
    base: BaseRef
    trainer: Literal["local", "remote"]
    key: str
    hyperparameters: dict[str, Any]
    work: Path
    preset: str | None = None  # local: the `[finetune]` preset the hyperparameters start from
    recipe: str = ""  # the recipe in one line (`codeclm.train.finetune.describe_recipe`)

    @property
    def served_name(self) -> str:
        return f"tuned-{self.key[:12]}"
