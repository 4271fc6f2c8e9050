"""All settings in one place, with the paper's defaults; a TOML file, CODECLM_* env vars and CLI flags override.

Every decision the paper leaves open (docs/codeclm.md §1, "not specified") is a named field here.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from codeclm.errors import ConfigError

OutputMode = Literal["auto", "json_schema", "json_object", "text"]
EMBEDDED = "embedded"


class RoleConfig(BaseModel):
    """One model role (strong, target or judge): how to reach it and how to call it."""

    model: str = Field(EMBEDDED, description="litellm model string, or 'embedded' for the bundled SmolLM2")
    api_base: str | None = Field(None, description="endpoint URL for OpenAI-compatible servers (vLLM, ...)")
    api_key_env: str | None = Field(None, description="name of the env var holding the API key (never the key)")
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(1024, ge=1, le=131072)
    timeout: float = Field(120.0, gt=0, le=3600, description="seconds per HTTP attempt")
    max_concurrency: int = Field(64, ge=1, le=1024, description="ceiling of the adaptive limit of requests in "
                                 "flight to this role's endpoint (hosted APIs take 64 at once; 429s lower it)")
    requests_per_minute: float | None = Field(None, gt=0, description="pace requests to this rate; the provider's "
                                              "x-ratelimit-* headers set it too when they state a lower one")
    tokens_per_minute: float | None = Field(None, gt=0, description="pace tokens (prompt + answer) to this rate")
    output_mode: OutputMode = Field("auto", description="structured-output protocol; auto picks per model")
    context_tokens: int | None = Field(None, ge=256, description="prompt+answer limit; from litellm if None")

    @property
    def embedded(self) -> bool:
        return self.model == EMBEDDED


class Settings(BaseSettings):
    """Pipeline, gateway and runner settings (paper defaults where the paper gives one)."""

    model_config = SettingsConfigDict(env_prefix="CODECLM_", env_nested_delimiter="__", extra="forbid")

    strong: RoleConfig = Field(default_factory=RoleConfig)
    target: RoleConfig = Field(default_factory=RoleConfig)
    judge: RoleConfig = Field(default_factory=lambda: RoleConfig(temperature=0.0))

    # CodecLM pipeline (paper §5.3, A.3)
    seed_sample: int | None = Field(None, ge=1, description="use a reproducible sample of N seeds (the paper "
                                    "seeds from a 20% split of each benchmark); None uses all")
    n_metadata: int = Field(200, ge=1, description="metadata after mix-and-match augmentation")
    max_skills: int = Field(3, ge=1, le=10, description="skills kept per encoded seed")
    augment_max_skills: int = Field(3, ge=1, le=10, description="skills per augmented metadata (1..this)")
    n_rubrics: int = Field(4, ge=1, le=10, description="rubrics and actions per metadata")
    max_rounds: int = Field(4, ge=1, le=10, description="Self-Rubrics rounds; the basic instruction is round 1")
    threshold: float = Field(3.0, ge=0, le=9, description="keep when |score gap| > threshold (theta)")
    budget: int = Field(2000, ge=1, description="training pairs wanted; extra kept pairs are sampled out")
    oversample: float = Field(2.0, ge=1, le=20, description="basic instructions made per wanted pair")
    instructions_per_metadata: int | None = Field(None, ge=1, le=50, description="overrides the budget split")
    action_sampling: Literal["without_replacement", "with_replacement"] = "without_replacement"
    keep_target_when_better: bool = Field(True, description="keep the target answer when G < -threshold")
    drop_seed_overlap: bool = Field(True, description="reject generated instructions equal to a seed")
    scorer: Literal["strong", "judge"] = Field("strong", description="who scores in Contrastive Filtering")
    score_temperature: float = Field(0.0, ge=0, le=2, description="temperature of pairwise scoring")
    seed: int = Field(0, description="random seed for augmentation, action choice and budget sampling")

    # Runner
    batch_size: int = Field(200, ge=1, le=10000, description="seeds per batch task")
    max_parallel_batches: int = Field(4, ge=1, le=64, description="batch tasks running at once")
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = Field(None, description="existing Dask scheduler; None starts a local cluster")
    dask_workers: int = Field(2, ge=1, le=256)

    # Gateway
    home: Path = Field(default_factory=lambda: Path(os.environ.get("CODECLM_HOME", ".codeclm")),
                       description="call cache, work files and benchmark downloads live here")
    max_attempts: int = Field(4, ge=1, le=20, description="HTTP attempts per call (1 + retries)")
    parse_attempts: int = Field(3, ge=1, le=10, description="calls when the output does not parse")
    backoff_base: float = Field(1.0, ge=0, description="first retry delay, seconds; doubles, with jitter")
    backoff_max: float = Field(30.0, ge=0)
    retry_after_cap: float = Field(120.0, ge=0, description="a longer Retry-After fails the call at once")
    breaker_failures: int = Field(20, ge=1, description="consecutive connection failures that stop a run")

    @field_validator("judge", mode="before")
    @classmethod
    def _judge_is_deterministic(cls, value: object) -> object:
        """The judge defaults to temperature 0 (paper §5.3) even when only its model is configured."""
        if isinstance(value, dict) and "temperature" not in value:
            return {**value, "temperature": 0.0}
        return value

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _clamp_augment_skills(self) -> Settings:
        if self.augment_max_skills > self.max_skills:
            self.augment_max_skills = self.max_skills
        return self

    @property
    def cache_dir(self) -> Path:
        return self.home / "calls"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    def role(self, name: str) -> RoleConfig:
        return getattr(self, name)

    def per_metadata(self, n_metadata: int) -> int:
        """Basic instructions per metadata: the budget, oversampled for filtering, split evenly (paper §5.3)."""
        if self.instructions_per_metadata:
            return self.instructions_per_metadata
        return max(1, math.ceil(self.budget * self.oversample / max(n_metadata, 1)))

    @classmethod
    def load(cls, config: Path | None = None, **overrides: Any) -> Settings:
        """Settings from a TOML file, then CODECLM_* env vars, then non-None overrides (CLI flags)."""
        data: dict[str, Any] = {}
        if config is not None:
            try:
                data = tomllib.loads(config.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{config}: config file not found") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{config}: not valid TOML ({exc})") from None
        for key, value in overrides.items():
            if value is None:
                continue
            if key in ("strong", "target", "judge"):
                data.setdefault(key, {})["model"] = value
            else:
                data[key] = value
        try:
            return cls(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, config)) from None


def format_validation_error(exc: ValidationError, source: Path | None) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    origin = f"{source}: " if source else ""
    return f"{origin}invalid setting {where}: {err['msg']} (got {err.get('input')!r})"
