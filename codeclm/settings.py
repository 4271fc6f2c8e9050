"""All settings in one place, with the paper's defaults; a TOML file, CODECLM_* env vars and CLI flags override.

Every decision the paper leaves open (docs/codeclm.md §1, "not specified") is a named field here.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from codeclm.errors import ConfigError

OutputMode = Literal["auto", "json_schema", "json_object", "text"]
Preset = Literal["default", "paper"]
SeedSource = Literal["benchmark", "alpaca"]
# The final judge's prompt file: `judge` (this project's wording, JSON or text by `output_mode`) or `judge_fig12`
# (the paper's Fig. 12, the Vicuna/Alpagasus pairwise template word for word; it has no JSON form, so it is
# always answered in plain text).
JudgeTemplate = Literal["judge", "judge_fig12"]
# Paper A.2: CodecLM and its ablations start from the benchmark's seeds; Self-Instruct, Tree-Instruct, WizardLM
# and Alpagasus (Self-Instruct's pairs) from a random Alpaca subsample; WizardLM+ from CodecLM's basic
# instructions (it takes the benchmark seeds only when it has to encode them itself).
PAPER_SEED_SOURCES: dict[str, str] = {
    "codeclm": "benchmark", "metadata_only": "benchmark", "no_contrastive_filtering": "benchmark",
    "wizardlm_plus": "benchmark", "self_instruct": "alpaca", "evol_instruct": "alpaca", "tree_instruct": "alpaca",
    "alpagasus": "alpaca"}
EMBEDDED = "embedded"
ROLES = ("strong", "target", "judge")
DECODE_MAX_PER_CALL = 50  # instructions one decode call may ask for; larger counts are split over calls
MAX_SKILLS = 10  # the most skills `max_skills` may keep; an encode answer listing more is cut to this

# Named presets: values a preset puts under the config file, env vars and flags (which still win). `default` is
# the field defaults below; `paper` states every setting the paper gives (§5.3, A.3, A.4) and, for what the paper
# leaves open, the choice the README names. The paper describes no duplicate removal, so `paper` keeps repeats.
# A section's values (a role, `finetune`) are filled key by key: `[finetune] preset = "cpu"` still wins.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "n_metadata": 200, "max_skills": 3, "augment_max_skills": 3, "n_rubrics": 4, "max_rounds": 4,
        "threshold": 3.0, "budget": 2000, "oversample": 2.0, "instructions_per_metadata": None,
        "action_sampling": "without_replacement", "keep_target_when_better": True, "drop_seed_overlap": True,
        "drop_duplicates": False, "scorer": "strong", "score_temperature": 0.0, "seed_sample": None,
        "rule": "codeclm", "judge_template": "judge_fig12",
        "protocol": {"seed_sources": PAPER_SEED_SOURCES},
        "strong": {"temperature": 0.7, "max_tokens": 2048},
        "target": {"temperature": 0.7, "max_tokens": 2048},
        "judge": {"temperature": 0.0, "output_mode": "text"},
        "finetune": {"preset": "paper"},  # A.4's training recipe (full fine-tune), see FinetuneConfig
    },
}


class RoleConfig(BaseModel):
    """One model role (strong, target or judge): how to reach it and how to call it."""

    model: str = Field(EMBEDDED, description="litellm model string, or 'embedded' for the bundled SmolLM2")
    api_base: str | None = Field(None, description="endpoint URL for OpenAI-compatible servers (vLLM, ...)")
    api_key_env: str | None = Field(None, description="name of the env var holding the API key (never the key)")
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(2048, ge=1, le=131072, description="answer limit (paper A.3: 2048 for LLaMA runs)")
    timeout: float = Field(120.0, gt=0, le=3600, description="seconds per HTTP attempt")
    max_concurrency: int = Field(64, ge=1, le=1024, description="ceiling of the adaptive limit of requests in "
                                 "flight to this role's endpoint (hosted APIs take 64 at once; 429s lower it)")
    requests_per_minute: float | None = Field(None, gt=0, description="pace requests to this rate; the provider's "
                                              "x-ratelimit-* headers set it too when they state a lower one")
    tokens_per_minute: float | None = Field(None, gt=0, description="pace tokens (prompt + answer) to this rate")
    output_mode: OutputMode = Field("auto", description="structured-output protocol; auto picks per model")
    context_tokens: int | None = Field(None, ge=256, description="prompt+answer limit; from litellm if None")
    identity: str | None = Field(None, description="what names this model in cache keys instead of model@api_base "
                                 "(a model codeclm serves on a new port each run is still the same model)")

    @property
    def embedded(self) -> bool:
        return self.model == EMBEDDED


FinetunePreset = Literal["cpu", "paper"]
_PRESETS: dict[str, dict[str, Any]] = {
    # LoRA on a CPU: small, fast, and enough to move a 135M model in minutes (docs/finetune.md).
    "cpu": {"method": "lora", "epochs": 3.0, "learning_rate": 2e-4, "min_learning_rate": 0.0,
            "lr_schedule": "linear", "warmup_ratio": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
            "weight_decay": 0.0, "batch_size": 8, "micro_batch_size": 8, "max_length": 1024, "lora_r": 8,
            "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_modules": "all-linear",
            "gradient_checkpointing": False},
    # Paper A.4 (LLaMA): full fine-tuning, AdamW (0.9, 0.95), lr 1e-5 decayed linearly to 1e-6, global batch 64
    # (8 per GPU), 15 epochs, length 2048. Warmup and weight decay are not stated: none.
    "paper": {"method": "full", "epochs": 15.0, "learning_rate": 1e-5, "min_learning_rate": 1e-6,
              "lr_schedule": "linear", "warmup_ratio": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.95,
              "weight_decay": 0.0, "batch_size": 64, "micro_batch_size": 8, "max_length": 2048, "lora_r": 8,
              "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_modules": "all-linear",
              "gradient_checkpointing": True},
}


class TrainHyper(BaseModel):
    """The hyperparameters a training actually uses: the preset with the explicit settings on top."""

    model_config = ConfigDict(frozen=True)

    method: Literal["lora", "full"]
    epochs: float
    max_steps: int | None
    learning_rate: float
    min_learning_rate: float
    lr_schedule: Literal["linear", "cosine", "constant"]
    warmup_ratio: float
    adam_beta1: float
    adam_beta2: float
    weight_decay: float
    batch_size: int
    micro_batch_size: int
    max_length: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: str
    gradient_checkpointing: bool
    precision: Literal["auto", "bf16", "fp32"]
    seed: int


class RemoteFinetuneConfig(BaseModel):
    """OpenAI-style fine-tuning jobs (through litellm): where to send them and the job's own hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["openai", "azure", "vertex_ai"] = "openai"
    api_base: str | None = Field(None, description="files and fine_tuning endpoints; None: the provider's default")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="env var holding the key (never the key)")
    n_epochs: int | None = Field(None, ge=1, le=50, description="None lets the provider choose ('auto')")
    batch_size: int | None = Field(None, ge=1, le=256)
    learning_rate_multiplier: float | None = Field(None, gt=0, le=10)
    poll_seconds: float = Field(30.0, gt=0, le=3600, description="seconds between job status checks")
    timeout_hours: float = Field(24.0, gt=0, description="stop waiting (the job keeps running; rerun to resume)")


class FinetuneConfig(BaseModel):
    """`[finetune]`: train the target on the generated pairs. Unset hyperparameters come from `preset`."""

    model_config = ConfigDict(extra="forbid")

    trainer: Literal["local", "remote", "off"] = Field("local", description="local: TRL + PEFT on this machine")
    base_model: str = Field(EMBEDDED, description="'embedded' (SmolLM2 GGUF), a GGUF file, a local HF checkpoint "
                            "or hub id; for the remote trainer the provider's model name")
    preset: FinetunePreset = Field("cpu", description="cpu: LoRA defaults; paper: A.4 full fine-tune (GPU)")
    method: Literal["lora", "full"] | None = None
    epochs: float | None = Field(None, gt=0, le=100)
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps (overrides epochs)")
    learning_rate: float | None = Field(None, gt=0, le=1)
    min_learning_rate: float | None = Field(None, ge=0, le=1, description="where the schedule decays to")
    lr_schedule: Literal["linear", "cosine", "constant"] | None = None
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    adam_beta1: float | None = Field(None, ge=0, lt=1)
    adam_beta2: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0, le=1)
    batch_size: int | None = Field(None, ge=1, le=4096, description="pairs per optimizer step (global)")
    micro_batch_size: int | None = Field(None, ge=1, le=4096, description="pairs per forward pass")
    max_length: int | None = Field(None, ge=32, le=131072, description="tokens per pair; longer ones are cut")
    lora_r: int | None = Field(None, ge=1, le=1024)
    lora_alpha: int | None = Field(None, ge=1, le=4096)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    lora_target_modules: str | None = Field(None, description="'all-linear' or comma-separated module names")
    gradient_checkpointing: bool | None = None
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 where the hardware has it")
    seed: int = 0
    save_steps: int = Field(25, ge=1, description="checkpoint every N steps; a killed training resumes there")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads for training; None: all cores")
    memory_limit_gb: float | None = Field(None, gt=0, description="refuse to train above this estimate; None: "
                                          "the memory available now (GPU memory with CUDA)")
    remote: RemoteFinetuneConfig = Field(default_factory=RemoteFinetuneConfig)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        hyper = self.hyper()
        if hyper.batch_size % hyper.micro_batch_size:
            raise ValueError(f"batch_size {hyper.batch_size} is not a multiple of micro_batch_size "
                             f"{hyper.micro_batch_size}")
        if hyper.min_learning_rate > hyper.learning_rate:
            raise ValueError(f"min_learning_rate {hyper.min_learning_rate} is above learning_rate "
                             f"{hyper.learning_rate}")
        return self

    def hyper(self) -> TrainHyper:
        """The effective hyperparameters; part of the training's cache key."""
        values = dict(_PRESETS[self.preset])
        values.update({k: v for k, v in self.model_dump(include=set(TrainHyper.model_fields)).items()
                       if v is not None})
        values.setdefault("max_steps", None)
        return TrainHyper(**values)


class BaselineSettings(BaseModel):
    """The `[baselines]` section: the paper's baselines (§5.1, A.2) run in this engine (docs/baselines.md)."""

    model_config = ConfigDict(extra="forbid")

    rouge_threshold: float = Field(0.7, gt=0, le=1, description="Self-Instruct keeps an instruction only when its "
                                   "ROUGE-L F with every pool instruction is below this")
    seed_demos: int = Field(6, ge=1, le=20, description="Self-Instruct: seed instructions shown per call")
    generated_demos: int = Field(2, ge=0, le=20, description="Self-Instruct: generated instructions shown per call")
    new_per_call: int = Field(8, ge=1, le=DECODE_MAX_PER_CALL, description="Self-Instruct: new instructions "
                              "asked per call")
    calls_per_round: int = Field(8, ge=1, le=256, description="Self-Instruct: concurrent calls per bootstrap round")
    max_generation_calls: int = Field(20000, ge=1, description="Self-Instruct: stated limit on generation calls; "
                                      "reaching it ends bootstrapping with a reported shortfall")
    evol_rounds: int = Field(4, ge=1, le=10, description="Evol-Instruct / WizardLM+ evolution rounds")
    evol_breadth_weight: float = Field(0.5, ge=0, le=5, description="draw weight of in-breadth evolution; each of "
                                       "the five in-depth methods weighs 1")
    evol_oversample: float = Field(1.25, ge=1, le=20, description="evolved instructions made per wanted pair "
                                   "(elimination and answer checks drop some)")
    alpagasus_threshold: float = Field(4.5, ge=0, le=5, description="Alpagasus keeps pairs the judge rates at least "
                                       "this, on the original filter's 0-5 accuracy scale")
    alpagasus_oversample: float = Field(2.0, ge=1, le=50, description="Self-Instruct pairs rated per wanted pair "
                                        "at first; topped up while fewer than the budget pass")
    alpagasus_max_oversample: float = Field(6.0, ge=1, le=100, description="stated limit: at most budget x this "
                                            "pairs are rated; reaching it ends with a reported shortfall")
    answer_topups: int = Field(3, ge=0, le=20, description="extra generate/answer passes to replace failed answers")
    tree_nodes: int = Field(10, ge=1, le=50, description="Tree-Instruct: nodes added to each instruction's semantic "
                            "tree (paper A.2: 10)")


class StudySettings(BaseModel):
    """`[studies]`: the points of the paper's metadata (Fig. 4) and budget (Fig. 5) sweeps under `codeclm protocol
    --study`."""

    model_config = ConfigDict(extra="forbid")

    metadata_fractions: list[float] = Field([0.2, 0.4, 0.6, 0.8, 1.0], min_length=1, description="shares of the "
                                            "metadata kept at the same budget (Fig. 4)")
    budgets: list[int] = Field([500, 1000, 2000, 4000, 8000], min_length=1, description="data sizes (Fig. 5)")
    budget_methods: list[str] = Field(["codeclm", "wizardlm_plus"], min_length=1, description="methods swept over "
                                      "`budgets` (Fig. 5: CodecLM and WizardLM+)")

    @field_validator("metadata_fractions")
    @classmethod
    def _shares(cls, value: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in value):
            raise ValueError("each fraction must be in (0, 1]")
        return sorted(set(value))

    @field_validator("budgets")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if any(b < 1 for b in value):
            raise ValueError("each budget must be at least 1")
        return sorted(set(value))


class ProtocolSettings(BaseModel):
    """The `[protocol]` section: where each method's seeds come from and the judge check (docs/protocol.md)."""

    model_config = ConfigDict(extra="forbid")

    alpaca: str = Field("alpaca", description="Alpaca's 52k instructions (CC BY-NC 4.0): 'alpaca' downloads the "
                        "public alpaca_data.json once into home; or a local file in its layout")
    alpaca_seeds: int = Field(175, ge=1, description="Alpaca instructions sampled as seeds for a method whose "
                              "recipe states no number (Self-Instruct's 175 seed tasks)")
    seed_sources: dict[str, SeedSource] = Field(default_factory=dict, description="method -> 'benchmark' (the "
                                                "recorded 20 % split) or 'alpaca' (a seeded Alpaca sample); a "
                                                "method not named takes the benchmark's")
    judge_check_questions: int = Field(5, ge=1, le=100, description="questions the judge check builds its pairs "
                                       "from (two pairs each, both orders)")
    judge_check_min: float = Field(0.9, ge=0, le=1, description="share of orders in which the judge must prefer "
                                   "the intact answer; a lower one is refused before any data is made")

    def source(self, method: str) -> SeedSource:
        return self.seed_sources.get(method, "benchmark")


class _Derived:
    """What follows from settings, the same for the whole `Settings` and for one step's `StageSettings`."""

    if TYPE_CHECKING:  # fields of both classes; pydantic must not see them here
        home: Path
        budget: int
        oversample: float
        instructions_per_metadata: int | None

    @property
    def cache_dir(self) -> Path:
        return self.home / "calls"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    def role(self, name: str) -> RoleConfig:
        role: RoleConfig = getattr(self, name)
        return role

    def per_metadata(self, n_metadata: int) -> int:
        """Basic instructions per metadata: the budget, oversampled for filtering, split evenly (paper §5.3)."""
        if self.instructions_per_metadata:
            return self.instructions_per_metadata
        return max(1, math.ceil(self.budget * self.oversample / max(n_metadata, 1)))

    def metadata_to_decode(self, available: int) -> int:
        """How many metadata get basic instructions: all of them, unless the budget (oversampled) asks for fewer
        instructions than there are metadata; then a sample, one instruction each, rather than one per metadata."""
        if self.instructions_per_metadata:
            return available
        return min(available, max(1, math.ceil(self.budget * self.oversample)))


class Settings(_Derived, BaseSettings):
    """Pipeline, gateway and runner settings (paper defaults where the paper gives one)."""

    model_config = SettingsConfigDict(env_prefix="CODECLM_", env_nested_delimiter="__", extra="forbid")

    strong: RoleConfig = Field(default_factory=RoleConfig)
    target: RoleConfig = Field(default_factory=RoleConfig)
    judge: RoleConfig = Field(default_factory=lambda: RoleConfig(temperature=0.0))
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    preset: Preset = Field("default", description="named set of values under the config file, env and flags")

    # CodecLM pipeline (paper §5.3, A.3)
    seed_sample: int | None = Field(None, ge=1, description="use a reproducible sample of N seeds (the paper "
                                    "seeds from a 20% split of each benchmark); None uses all")
    n_metadata: int = Field(200, ge=1, description="metadata after mix-and-match augmentation")
    max_skills: int = Field(3, ge=1, le=MAX_SKILLS, description="skills kept per encoded seed")
    augment_max_skills: int = Field(3, ge=1, le=MAX_SKILLS, description="skills per augmented metadata (1..this)")
    n_rubrics: int = Field(4, ge=1, le=10, description="rubrics and actions per metadata")
    max_rounds: int = Field(4, ge=1, le=10, description="Self-Rubrics rounds; the basic instruction is round 1")
    threshold: float = Field(3.0, ge=0, le=9, description="keep when |score gap| > threshold (theta)")
    budget: int = Field(2000, ge=1, description="training pairs wanted; extra kept pairs are sampled out")
    oversample: float = Field(2.0, ge=1, le=20, description="basic instructions made per wanted pair")
    instructions_per_metadata: int | None = Field(None, ge=1, description="overrides the budget split; more than "
                                                  f"{DECODE_MAX_PER_CALL} are asked for over several calls")
    action_sampling: Literal["without_replacement", "with_replacement"] = "without_replacement"
    keep_target_when_better: bool = Field(True, description="keep the target answer when G < -threshold")
    drop_seed_overlap: bool = Field(True, description="reject generated instructions equal to a seed")
    drop_duplicates: bool = Field(True, description="reject basic instructions repeating an earlier one, across "
                                  "all batches (the paper describes no duplicate removal)")
    metadata_fraction: float = Field(1.0, gt=0, le=1, description="decode from a reproducible random sample of "
                                     "this share of the augmented metadata (Fig. 4's mismatch study; 1: all)")
    contrastive_filtering: bool = Field(True, description="score strong against target answers and keep only "
                                        "clear gaps; false (Table 3's ablations): every final instruction gets "
                                        "the strong model's answer, no target answers, no scores")
    review: Literal["off", "metadata", "dataset"] = Field("off", description="the paper's manual check: pause for "
                                                          "a reviewer after augmentation (metadata) or before "
                                                          "publishing and training (dataset)")
    review_timeout: float | None = Field(None, gt=0, description="seconds a review waits for an answer; None: "
                                         "until answered")
    max_topups: int = Field(3, ge=0, le=20, description="stated limit: extra decode-and-rounds passes while fewer "
                            "pairs than the budget were kept; reaching it publishes the shortfall, loudly")
    scorer: Literal["strong", "judge"] = Field("strong", description="who scores in Contrastive Filtering")
    score_temperature: float = Field(0.0, ge=0, le=2, description="temperature of pairwise scoring")
    seed: int = Field(0, description="random seed for augmentation, action choice and budget sampling")

    # CRR evaluation
    rule: Literal["codeclm", "alpagasus"] = Field("codeclm", description="how two judged orders become one "
                                                  "verdict: codeclm (wins twice) or alpagasus (win + draw)")
    judge_template: JudgeTemplate = Field("judge", description="the final judge's prompt file: judge (JSON or text "
                                          "by output_mode) or judge_fig12 (the paper's Fig. 12 wording, plain text)")
    eval_overlap: str | None = Field(None, description="a JSONL of evaluation questions (the protocol writes it): "
                                     "training pairs whose instruction matches one (normalised exact match or "
                                     "ROUGE-L >= 0.7) are rejected as eval_overlap before the budget is applied")

    # Baselines (Self-Instruct, Evol-Instruct, WizardLM+, Alpagasus, Tree-Instruct)
    baselines: BaselineSettings = Field(default_factory=BaselineSettings)
    # The paper's experiment (`codeclm protocol`)
    protocol: ProtocolSettings = Field(default_factory=ProtocolSettings)

    # The paper's further studies in `codeclm protocol` (Figs. 4, 5; codeclm.eval.studies); no step reads them
    studies: StudySettings = Field(default_factory=StudySettings)

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
    backoff_base: float = Field(0.5, ge=0, description="first retry delay, seconds; doubles, with jitter (as the "
                                "OpenAI SDK: the AIMD limit and Retry-After, not this, hold back an overloaded API)")
    backoff_max: float = Field(8.0, ge=0)
    retry_after_cap: float = Field(120.0, ge=0, description="a longer Retry-After fails the call at once")
    call_deadline: float = Field(300.0, gt=0, le=86400, description="seconds one call may take in all: every "
                                 "attempt, backoff and parse retry (waits for a free slot or for an unreachable "
                                 "endpoint do not count); past it the call is recorded as failed")
    hedge: bool = Field(True, description="send a second copy of a call in flight far longer than its endpoint's "
                        "recent latency (another when that one also goes unanswered twice as long, at most "
                        "max_attempts - 1 per call), take the first answer and cancel the others")
    hedge_factor: float = Field(3.0, ge=1, description="hedge after this many times the endpoint's recent 95th "
                                "percentile latency ...")
    hedge_min_s: float = Field(2.0, gt=0, description="... but never sooner than this many seconds")
    breaker_failures: int = Field(20, ge=1, description="connection failures in a row that open an endpoint's "
                                  "breaker: its calls pause while one probe every breaker_probe_s checks it")
    breaker_probe_s: float = Field(5.0, gt=0, description="seconds between probes of an unreachable endpoint")
    breaker_stop_after: float = Field(300.0, gt=0, description="seconds an endpoint may stay unreachable before "
                                      "the run stops (completed calls are kept; run again to resume)")
    retry_failed: bool = Field(False, description="ask again the calls an earlier run kept as failed (the same "
                               "unusable answer twice at temperature 0); by default a rerun reports them from the call "
                               "cache (`--retry-failed`)")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill what the file, env and flags left unset from the chosen preset (they always win over it)."""
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "default")
        values = PRESETS.get(name) if isinstance(name, str) else None
        if not values:
            return data  # `default`, or an unknown name that field validation reports
        data = dict(data)
        for key, value in values.items():
            given = data.get(key)
            if not isinstance(value, dict):
                data.setdefault(key, value)
                continue
            # a role or a section: the preset fills the fields the file, env and flags left unset
            section = given.model_dump(exclude_unset=True) if isinstance(given, BaseModel) else dict(given or {})
            data[key] = {**value, **section}
        return data

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

    def with_finetune(self, source: Path | None = None, **overrides: Any) -> Settings:
        """A copy with `[finetune]` fields replaced (CLI flags; None keeps the value), validated again."""
        values = {**self.finetune.model_dump(exclude_unset=True),
                  **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return self.model_copy(update={"finetune": FinetuneConfig.model_validate(values)})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    def for_stage(self, stage: str, *roles: str) -> StageSettings:
        """The settings step `stage` reads (`STAGE_READS`), plus `roles` (the role a step answers as); the
        scorer's role follows `scorer`. Only these enter the step's cache key, work folder and gateway."""
        names = [*STAGE_READS[stage], *roles]
        if "scorer" in names and self.scorer == "judge":
            names.append("judge")
        return scope(self, stage, names)

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
            if key in ROLES:
                data.setdefault(key, {})["model"] = value
            else:
                data[key] = value
        try:
            return cls(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, config)) from None


# The settings the gateway reads besides role configs: they enter its identity and every calling step's key.
CALLS = ("home", "max_attempts", "parse_attempts", "backoff_base", "backoff_max", "retry_after_cap",
         "breaker_failures", "breaker_probe_s", "breaker_stop_after", "call_deadline", "hedge", "hedge_factor",
         "hedge_min_s", "retry_failed")
# What generation wrote into a manifest: every setting except the later steps' sections and `retry_failed`, which
# says what a run asks again, not what the data is.
_GENERATION = tuple(name for name in Settings.model_fields
                    if name not in ("finetune", "baselines", "studies", "protocol", "retry_failed"))

# Every step's settings: what it reads, so that only these enter its Prefect cache key (INPUTS), its work folder
# and its gateway. A step reading anything else fails with AttributeError (see `StageSettings`).
STAGE_READS: dict[str, tuple[str, ...]] = {
    "seeds": ("home", "batch_size", "seed_sample", "seed"),
    "encode": ("strong", "max_skills", *CALLS),
    "augment": ("home", "n_metadata", "augment_max_skills", "seed", "budget", "oversample",
                "instructions_per_metadata", "metadata_fraction"),
    "rubrics": ("strong", "n_rubrics", *CALLS),
    "decode": ("strong", "drop_seed_overlap", *CALLS),
    "dedup": ("home",),
    "review": ("home", "review_timeout"),  # the metadata gate (the dataset gate is the export's: `review`)
    # respond, score, filter and improve, round by round (`tasks.rounds`); the scorer's role is added
    "rounds": ("strong", "target", "scorer", "score_temperature", "threshold", "keep_target_when_better",
               "max_rounds", "action_sampling", "seed", "contrastive_filtering", *CALLS),
    "export": _GENERATION,
    "answer": CALLS,  # plus the role answering (`for_stage("answer", role)`)
    "judge": ("judge", "judge_template", *CALLS),
    "judge_check": ("judge", "strong", "judge_template", *CALLS),
    "finetune": ("home", "finetune"),
    "self_instruct": ("strong", "seed", "baselines", *CALLS),
    "evol": ("strong", "seed", "baselines", *CALLS),
    "basic": ("home", "budget", "seed", "baselines"),
    "tree_instruct": ("strong", "seed", "baselines", *CALLS),
    "pairs": ("strong", "target", "seed", *CALLS),
    "alpagasus": ("judge", "baselines", *CALLS),
    "publish_baseline": (*_GENERATION, "baselines"),
}


class StageSettings(_Derived, BaseModel):
    """The settings one step reads, by name: what it hashes into its cache key and work folder. Reading a
    setting the step did not declare raises AttributeError, so a declaration cannot silently fall short."""

    model_config = ConfigDict(frozen=True)

    stage: str
    settings: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("settings")
        if values is not None and name in values:
            return values[name]
        if name.startswith("_") or values is None:
            return super().__getattr__(name)  # type: ignore[misc]
        raise AttributeError(f"step {self.__dict__.get('stage')!r} reads setting {name!r} without declaring it "
                             "(codeclm.settings.STAGE_READS)")

    def dump(self) -> dict[str, Any]:
        """The settings as JSON values, as a manifest records them."""
        values: dict[str, Any] = self.model_dump(mode="json")["settings"]
        return values


def scope(settings: Settings | StageSettings, stage: str, names: Iterable[str]) -> StageSettings:
    """The named settings of `settings` as a `StageSettings` (from a view, only what the view declares)."""
    return StageSettings(stage=stage, settings={name: getattr(settings, name) for name in dict.fromkeys(names)})


def format_validation_error(exc: ValidationError, source: Path | None) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    origin = f"{source}: " if source else ""
    return f"{origin}invalid setting {where}: {err['msg']} (got {err.get('input')!r})"
