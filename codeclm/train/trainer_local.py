"""The local trainer: TRL's SFTTrainer with PEFT LoRA (or a full fine-tune) on the dataset's chat pairs.

The only module that imports torch, transformers, trl, peft and datasets, and only inside functions. A GGUF base
(the embedded SmolLM2) is converted once into a plain Hugging Face checkpoint under HOME/finetune/base, because
Trainer refuses a model still flagged as GGUF-quantized. A base whose tokenizer has no chat template trains in
the Alpaca format (`codeclm.train.prompt_format`), and is served from a copy carrying it. Checkpoints go to
WORK/checkpoints every `save_steps`; a rerun after a kill resumes from the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codeclm.errors import ModelError
from codeclm.settings import FinetuneConfig, TrainHyper
from codeclm.train.prompt_format import ALPACA, OWN, ensure_template, templated_base
from codeclm.train.training_plan import EXAMPLE_FILE, BaseRef, FinetunePlan

log = logging.getLogger(__name__)
StepListener = Callable[[int, int, float | None], None]  # (step, total steps, loss or None)
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MERGED = "merged"
_STATE = "trainer_state.json"


@dataclass
class TrainOutcome:
    """What one local training produced (paths are inside the work directory, but `base_checkpoint`: the base
    to serve as the untuned baseline, in the format the training used)."""

    base_checkpoint: Path
    merged: Path
    adapter: Path | None
    log: list[dict[str, Any]]
    steps: int
    resumed_from_step: int | None
    seconds: float
    device: str
    precision: str
    prompt_format: str = OWN
    extra: dict[str, Any] = field(default_factory=dict)


def count_params(base: BaseRef) -> int:
    """Parameters of the base model from file headers or its config (on the meta device): nothing is loaded."""
    if base.kind == "gguf":
        from gguf import GGUFReader

        return int(sum(int(t.n_elements) for t in GGUFReader(base.location).tensors))
    files = sorted(Path(base.location).glob("*.safetensors")) if base.kind == "checkpoint" else []
    if files:
        from safetensors import safe_open

        total = 0
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shape = fh.get_slice(name).get_shape()
                    total += _prod(shape)
        return total
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base.location)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"base model {base.name}: cannot read its config ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None
    return sum(p.numel() for p in model.parameters())


def _prod(shape: list[int]) -> int:
    total = 1
    for n in shape:
        total *= int(n)
    return total


def plain_checkpoint(base: BaseRef, home: Path) -> Path:
    """A Hugging Face checkpoint Trainer accepts: the base itself, or (GGUF) a dequantized copy made once."""
    if base.kind != "gguf":
        return Path(base.location)  # a checkpoint directory, or a hub id transformers resolves itself
    target = home / "finetune" / "base" / base.identity.replace(":", "-")[:24]
    if (target / "config.json").exists() and (target / "_done").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(base.location)
    log.info("converting %s to a plain checkpoint in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "_done").write_text(base.identity + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer state (written last) is complete; half-written ones are removed."""
    if not folder.is_dir():
        return None
    complete: list[tuple[int, Path]] = []
    for path in folder.glob("checkpoint-*"):
        try:
            step = int(json.loads((path / _STATE).read_text())["global_step"])
        except (OSError, ValueError, KeyError):
            shutil.rmtree(path, ignore_errors=True)
            continue
        complete.append((step, path))
    return max(complete)[1] if complete else None


def _precision(hyper: TrainHyper, cuda: bool) -> str:
    """bf16 where the hardware computes it natively (CUDA, or AVX512-BF16/AMX CPUs: about 10x faster than fp32
    here); fp32 elsewhere, where bf16 would be emulated."""
    if hyper.precision != "auto":
        return hyper.precision
    import torch

    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    cpu = torch.cpu
    native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                    "_is_amx_tile_supported"))
    return "bf16" if native else "fp32"


def _schedule(hyper: TrainHyper) -> tuple[str, dict[str, Any]]:
    """The learning-rate schedule as transformers names it; linear decay to a floor is polynomial with power 1."""
    if hyper.lr_schedule == "constant" or hyper.min_learning_rate >= hyper.learning_rate:
        return ("constant_with_warmup" if hyper.warmup_ratio else "constant"), {}
    if hyper.lr_schedule == "cosine":
        return "cosine_with_min_lr", {"min_lr": hyper.min_learning_rate}
    if hyper.min_learning_rate == 0:
        return "linear", {}
    return "polynomial", {"lr_end": hyper.min_learning_rate, "power": 1.0}


def _pairs(path: Path) -> list[dict[str, Any]]:
    """Chat rows as TRL prompt/completion pairs, so the loss is on the answer only."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def train(plan: FinetunePlan, cfg: FinetuneConfig, home: Path, on_step: StepListener) -> TrainOutcome:
    """Train (or go on training) the plan's model; saves the adapter and a merged, servable checkpoint."""
    started = time.monotonic()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    hyper = cfg.hyper()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    cuda = torch.cuda.is_available()
    precision = _precision(hyper, cuda)
    base_dir = plain_checkpoint(plan.base, home)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base model {plan.base.name}: cannot load it ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None
    prompt_format = ensure_template(tokenizer)  # a base without a chat template trains in the Alpaca format
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # the untuned base is served from a copy that carries the same template, so it answers in the same format
    served_base = templated_base(base_dir, tokenizer, home, plan.base.identity) if prompt_format == ALPACA \
        else base_dir

    class Progress(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            on_step(state.global_step, state.max_steps, (logs or {}).get("loss"))

    scheduler, scheduler_kwargs = _schedule(hyper)
    checkpoints = plan.work / CHECKPOINTS
    resume = last_checkpoint(checkpoints)
    args = SFTConfig(
        output_dir=str(checkpoints), per_device_train_batch_size=hyper.micro_batch_size,
        gradient_accumulation_steps=hyper.batch_size // hyper.micro_batch_size, num_train_epochs=hyper.epochs,
        max_steps=hyper.max_steps or -1, learning_rate=hyper.learning_rate, lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs, warmup_steps=hyper.warmup_ratio, adam_beta1=hyper.adam_beta1,
        adam_beta2=hyper.adam_beta2, weight_decay=hyper.weight_decay, max_length=hyper.max_length,
        completion_only_loss=True, bf16=precision == "bf16", fp16=False,
        activation_checkpointing=hyper.gradient_checkpointing, logging_steps=1, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, report_to="none", seed=hyper.seed, data_seed=hyper.seed,
        use_cpu=not cuda, disable_tqdm=True, dataloader_num_workers=0)
    peft_config = None
    if hyper.method == "lora":
        from peft import LoraConfig

        targets: str | list[str] = hyper.lora_target_modules
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        peft_config = LoraConfig(r=hyper.lora_r, lora_alpha=hyper.lora_alpha, lora_dropout=hyper.lora_dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_pairs(plan.dataset.path)),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[Progress()])
    trainer.remove_callback(PrinterCallback)  # it prints every log line; progress goes through `on_step`
    (plan.work / EXAMPLE_FILE).write_text(tokenizer.decode(trainer.train_dataset[0]["input_ids"]))
    resumed = int(json.loads((resume / _STATE).read_text())["global_step"]) if resume else None
    if resume:
        log.info("resuming %s from %s", plan.key[:12], resume.name)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    adapter = None
    tuned = trainer.model
    if hyper.method == "lora":
        adapter = _save(plan.work / ADAPTER, tuned.save_pretrained)
        tuned = tuned.merge_and_unload()
    merged = _save(plan.work / MERGED, lambda path: (tuned.save_pretrained(path), tokenizer.save_pretrained(path)))
    rows = [{"step": int(e["step"]), "loss": float(e["loss"]), "learning_rate": e.get("learning_rate"),
             "epoch": e.get("epoch")} for e in trainer.state.log_history if "loss" in e]
    return TrainOutcome(served_base, merged, adapter, rows, int(trainer.state.global_step), resumed,
                        round(time.monotonic() - started, 3), "cuda" if cuda else "cpu", precision, prompt_format)


def _save(target: Path, save: Callable[[str], Any]) -> Path:
    """Write a model directory aside, then swap it in, so a kill never leaves half a model at `target`."""
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    save(str(staging))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target
