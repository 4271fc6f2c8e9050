"""Fine-tuning the target on a published dataset: the plan (checked before any work), the cache key, the typed
result, and the files a training leaves in DIR. No heavy imports here: torch and friends load only in
`codeclm.train.trainer_local`, so `codeclm --help` and a bad dataset stay fast.

Work lives under HOME/finetune/<key>/ (checkpoints, adapter, merged model, log); DIR receives hard links to the
finished files, published in one atomic flip (codeclm.publish). The key is the dataset's sha256, the base model,
the trainer and the effective hyperparameters: a finished key is never trained again, an unfinished one resumes
from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from codeclm.errors import ConfigError, DatasetError, ModelError
from codeclm.publish import publishing
from codeclm.settings import EMBEDDED, FinetuneConfig, Settings
from codeclm.storage import package_versions, write_json
from codeclm.train.prompt_format import template_digest
from codeclm.train.training_plan import EXAMPLE_FILE, BaseRef, Dataset, FinetunePlan

INSTALL_HINT = "install the train extra: pip install -e '.[train]' (or make install)"
TRAIN_MODULES = ("torch", "transformers", "trl", "peft", "datasets", "gguf")
DATASET_FILE = "train.jsonl"
LOG_FILE = "training_log.parquet"
PLOT_FILE = "loss.svg"
MANIFEST = "manifest.json"
DONE = "_done.json"
# Peak bytes per parameter, fp32 weights: LoRA holds the weights plus one copy while converting or merging;
# a full fine-tune adds gradients and AdamW's two moments (4 + 4 + 8) and the same copy.
BYTES_PER_PARAM = {"lora": 8, "full": 20}
LOCAL_FILES = ["adapter", "merged", LOG_FILE, PLOT_FILE, EXAMPLE_FILE, MANIFEST]
REMOTE_FILES = ["job.json", MANIFEST]
Listener = Callable[[int, int, float | None], None]  # (step, or percent for remote jobs; total; loss or None)
LOG_SCHEMA = pa.schema([("step", pa.int64()), ("loss", pa.float64()), ("learning_rate", pa.float64()),
                        ("epoch", pa.float64())])


class FinetuneResult(BaseModel):
    """What a finished fine-tune hands on: where the model is, what it was trained on, and how it went."""

    out: str
    trainer: Literal["local", "remote"]
    key: str
    data_sha: str
    pairs: int
    base_model: str
    base_checkpoint: str | None = None  # local: the plain HF checkpoint of the base (serve it as the baseline)
    merged_model: str | None = None  # local: DIR/merged, a servable HF checkpoint
    adapter: str | None = None  # local LoRA: DIR/adapter
    remote_model: str | None = None  # remote: litellm model string of the tuned model (provider/fine_tuned_model)
    remote_api_base: str | None = None  # remote: where that model answers (None: the provider's default)
    remote_job_id: str | None = None
    served_name: str  # a stable model name for serving the tuned model (same key, same name)
    first_loss: float | None = None
    final_loss: float | None = None
    steps: int = 0
    seconds: float = 0.0
    cached: bool = False  # nothing was trained in this call: an earlier identical training was reused
    resumed_from_step: int | None = None  # the checkpoint (local) a killed training went on from
    resumed_job: bool = False  # remote: an existing job was found and followed instead of starting one
    device: str | None = None  # local: cpu or cuda
    precision: str | None = None  # local: bf16 or fp32
    preset: str | None = None  # local: the `[finetune]` preset (cpu: LoRA; paper: A.4's full fine-tune)
    recipe: str | None = None  # the training recipe in one line (`describe_recipe`)
    prompt_format: str | None = None  # local: "the base's chat template", or "alpaca" for a base without one
    hyperparameters: dict[str, Any]


def load_dataset(path: Path) -> Dataset:
    """A generate output directory (its train.jsonl) or a JSONL file of chat `messages`; every line must end in
    an assistant turn after at least one user turn."""
    file = path / DATASET_FILE if path.is_dir() else path
    if not file.exists():
        where = f"{path} has no {DATASET_FILE}" if path.is_dir() else f"{path}: no such file"
        raise DatasetError(f"{where}; pass a dataset directory made by `codeclm generate` or its {DATASET_FILE}")
    raw = file.read_bytes()
    pairs = 0
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DatasetError(f"{file}: line {number} is not JSON") from None
        _check_messages(file, number, row)
        pairs += 1
    if pairs == 0:
        raise DatasetError(f"{file}: no training pairs; generate a dataset with kept pairs first "
                           "(lower `threshold` or raise `budget`)")
    return Dataset(file.absolute(), hashlib.sha256(raw).hexdigest(), pairs)


def _check_messages(file: Path, number: int, row: Any) -> None:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                          "assistant")
            for m in messages):
        raise DatasetError(f"{file}: line {number}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}")
    roles = [m["role"] for m in messages]
    if "user" not in roles or roles[-1] != "assistant":
        raise DatasetError(f"{file}: line {number}: a pair needs a user turn and ends with the assistant's answer")


def require_train_extra() -> None:
    """The local trainer's libraries, found without importing them (that costs seconds)."""
    missing = []
    for name in TRAIN_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module present in sys.modules as None, or a broken package
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ModelError(f"the local trainer needs {', '.join(missing)}, which is not installed; {INSTALL_HINT}")


def resolve_base(cfg: FinetuneConfig) -> BaseRef:
    """The base model a training starts from; bad names fail here, before anything loads."""
    name = cfg.base_model
    if cfg.trainer == "remote":
        if name == EMBEDDED:
            raise ConfigError("finetune.base_model is 'embedded', but the remote trainer needs the provider's model "
                              "name (e.g. gpt-4o-mini-2024-07-18); set --base or finetune.base_model")
        return BaseRef(name, "remote", name, f"remote:{cfg.remote.provider}:{name}")
    if name == EMBEDDED:
        from codeclm.llm.embedded import gguf_path

        path = gguf_path()
        return BaseRef("embedded SmolLM2-135M-Instruct", "gguf", str(path), f"gguf:{_file_sha(path)}")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"base model {name}: no such GGUF file")
        return BaseRef(path.name, "gguf", str(path.resolve()), f"gguf:{_file_sha(path)}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"base model {name}: directory has no config.json; give a Hugging Face checkpoint "
                             "directory, a .gguf file or 'embedded'")
        return BaseRef(path.name, "checkpoint", str(path.resolve()), f"checkpoint:{_dir_identity(path)}")
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise ModelError(f"base model {name}: not found; give 'embedded', a .gguf file, a Hugging Face checkpoint "
                         "directory or a hub id (org/name)")
    return BaseRef(name, "hub", name, f"hub:{name}")


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _dir_identity(path: Path) -> str:
    """A checkpoint's config and its weight files' names and sizes: cheap, and changes when the weights do."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.iterdir()):
        if file.suffix in (".safetensors", ".bin"):
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()


def training_key(data_sha: str, base: BaseRef, trainer: str, hyperparameters: dict[str, Any]) -> str:
    """The training's identity. A local one also holds the prompt format's template (`codeclm.train.prompt_format`),
    which decides how a base without a chat template is trained."""
    what = {"data": data_sha, "base": base.identity, "trainer": trainer, "hyper": hyperparameters}
    if trainer == "local":
        what["format"] = template_digest()
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def hyperparameters(cfg: FinetuneConfig) -> dict[str, Any]:
    """What decides the trained model (checkpoint interval, threads and memory limits do not)."""
    if cfg.trainer == "remote":
        r = cfg.remote
        return {"provider": r.provider, "n_epochs": r.n_epochs, "batch_size": r.batch_size,
                "learning_rate_multiplier": r.learning_rate_multiplier, "seed": cfg.seed}
    return cfg.hyper().model_dump()


def check_trainer(settings: Settings) -> BaseRef:
    """Everything about a training that can be checked without its data (trainer, extra, base model, memory):
    `codeclm run` calls it before generating, so a run that cannot train never pays for its dataset."""
    cfg = settings.finetune
    if cfg.trainer == "off":
        raise ConfigError("finetune.trainer is 'off'; set it to 'local' or 'remote' (--trainer) to train")
    if cfg.trainer == "local":
        require_train_extra()
    base = resolve_base(cfg)
    if cfg.trainer == "local":
        from codeclm.train.trainer_local import count_params

        check_fits(base, count_params(base), cfg)
    return base


def plan_finetune(dataset: Path, settings: Settings) -> FinetunePlan:
    """Check the request (dataset, trainer, base model, extra, memory) in seconds, before Prefect starts."""
    cfg = settings.finetune
    if cfg.trainer == "off":
        raise ConfigError("finetune.trainer is 'off'; set it to 'local' or 'remote' (--trainer) to train")
    data = load_dataset(dataset)
    base = check_trainer(settings)
    hyper = hyperparameters(cfg)
    key = training_key(data.sha, base, cfg.trainer, hyper)
    return FinetunePlan(data, base, cfg.trainer, key, hyper, settings.home / "finetune" / key[:20],
                        cfg.preset if cfg.trainer == "local" else None, describe_recipe(cfg))


def describe_recipe(settings: Settings | FinetuneConfig) -> str:
    """The training recipe in one line, for plans, manifests and reports: the preset, the method and the
    hyperparameters that decide the model, naming the ones set explicitly over the preset."""
    cfg = settings if isinstance(settings, FinetuneConfig) else settings.finetune
    if cfg.trainer == "off":
        return "no training (finetune.trainer = 'off')"
    if cfg.trainer == "remote":
        r = cfg.remote
        return (f"remote {r.provider} fine-tuning job on {cfg.base_model}: epochs {r.n_epochs or 'auto'}, batch "
                f"{r.batch_size or 'auto'}, learning-rate multiplier {r.learning_rate_multiplier or 'auto'}")
    h = cfg.hyper()
    origin = {"cpu": "preset cpu (LoRA for a CPU)", "paper": "preset paper (A.4)"}[cfg.preset]
    method = "full fine-tune" if h.method == "full" else \
        f"LoRA (r {h.lora_r}, alpha {h.lora_alpha}, dropout {h.lora_dropout:g}, {h.lora_target_modules})"
    length = f"{h.max_steps} steps" if h.max_steps else f"{h.epochs:g} epochs"
    schedule = "constant" if h.lr_schedule == "constant" else \
        f"{h.lr_schedule} to {h.min_learning_rate:g}"
    text = (f"{origin}: {method}, {length}, lr {h.learning_rate:g} {schedule}, warmup {h.warmup_ratio:g}, AdamW "
            f"({h.adam_beta1:g}, {h.adam_beta2:g}), weight decay {h.weight_decay:g}, batch {h.batch_size} "
            f"({h.micro_batch_size} per pass), max length {h.max_length}"
            + (", gradient checkpointing" if h.gradient_checkpointing else ""))
    preset = FinetuneConfig(preset=cfg.preset).hyper()
    changed = [name for name in type(h).model_fields if getattr(h, name) != getattr(preset, name)]
    return text + (f"; set over the preset: {', '.join(changed)}" if changed else "")


def recipe_warning(settings: Settings | FinetuneConfig) -> str | None:
    """One line when a local full fine-tune (the paper's A.4 recipe) will run without CUDA: it works if memory
    allows (`check_fits`), but it is meant for GPUs and takes hours on a CPU; None otherwise."""
    cfg = settings if isinstance(settings, FinetuneConfig) else settings.finetune
    if cfg.trainer != "local" or cfg.hyper().method != "full" or cuda_available():
        return None
    return (f"finetune preset {cfg.preset}: a full fine-tune without CUDA trains on the CPU, which is slow for "
            "anything but a tiny model; set [finetune] preset = \"cpu\" for LoRA")


def cuda_available() -> bool:
    """Whether torch is installed and sees a CUDA device (imports torch: seconds)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def check_fits(base: BaseRef, params: int, cfg: FinetuneConfig) -> None:
    """Refuse, before loading, a training whose estimated peak memory exceeds what the machine has."""
    method = cfg.hyper().method
    need = params * BYTES_PER_PARAM[method]
    limit, where = (cfg.memory_limit_gb * 1e9, "finetune.memory_limit_gb") if cfg.memory_limit_gb else \
        available_memory()
    if need > limit:
        raise ModelError(f"base model {base.name} has {params / 1e9:.2f}B parameters: {method} fine-tuning needs "
                         f"about {need / 1e9:.1f} GB ({BYTES_PER_PARAM[method]} bytes per parameter), {where} "
                         f"allows {limit / 1e9:.1f} GB; use a smaller model, method 'lora' or a bigger machine")


def available_memory() -> tuple[float, str]:
    """Bytes training may use: GPU memory with CUDA, else the memory available now (cgroup limit included)."""
    if cuda_available():
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory), "the GPU"
    available = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = float(next(line.split()[1] for line in meminfo.splitlines()
                               if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration):
        pass
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap != "max":
            available = min(available, float(cap))
    except OSError:
        pass
    return available, "this machine"


def done_result(plan: FinetunePlan) -> FinetuneResult | None:
    """The result of an earlier identical training, if one finished."""
    marker = plan.work / DONE
    if not marker.exists():
        return None
    return FinetuneResult.model_validate_json(marker.read_text())


def mark_done(plan: FinetunePlan, result: FinetuneResult) -> None:
    write_json(plan.work / DONE, result.model_dump(mode="json"))


def write_log(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{k: r.get(k) for k in LOG_SCHEMA.names} for r in rows], schema=LOG_SCHEMA)
    pq.write_table(table, path)
    return path


def read_log(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist() if path.exists() else []


def loss_svg(rows: list[dict[str, Any]], width: int = 480, height: int = 240) -> str:
    """Training loss by step as a small line chart (SVG written by hand: no plotting dependency)."""
    points = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    pad = 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="16" text-anchor="middle">training loss by step</text>']
    if points:
        steps, losses = [p[0] for p in points], [p[1] for p in points]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        top = max(losses) or 1.0

        def x(s: float) -> float:
            return pad + (s - s0) / (s1 - s0) * (width - 2 * pad)

        def y(v: float) -> float:
            return height - pad - v / top * (height - 2 * pad)

        path = " ".join(f"{'M' if i == 0 else 'L'}{x(s):.1f},{y(v):.1f}" for i, (s, v) in enumerate(points))
        parts += [f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>',
                  f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>',
                  f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="2"/>',
                  f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{top:.2f}</text>',
                  f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">0</text>',
                  f'<text x="{pad}" y="{height - pad + 16}">{s0}</text>',
                  f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">step {s1}</text>']
    parts.append("</svg>")
    return "\n".join(parts)


def report_markdown(result: FinetuneResult, rows: list[dict[str, Any]], chart_uri: str, max_rows: int = 20) -> str:
    """The markdown artifact: what was trained on what, the loss table (thinned to `max_rows`) and the chart."""
    model = result.merged_model or result.remote_model or "-"
    lines = [f"# Fine-tune · {result.trainer}", "",
             f"* base **{result.base_model}**, {result.pairs} pairs (sha256 `{result.data_sha[:12]}`)",
             f"* tuned model: `{model}`; {result.steps} steps in {result.seconds:.0f} s"
             + (" (reused, not retrained)" if result.cached else "")
             + (f" (resumed from step {result.resumed_from_step})" if result.resumed_from_step else ""),
             f"* loss {_fmt(result.first_loss)} → {_fmt(result.final_loss)}"]
    lines += [f"* recipe: {result.recipe}"] if result.recipe else []
    lines += [f"* prompt format: {result.prompt_format}"] if result.prompt_format else []
    lines += [""]
    if rows:
        every = max(1, -(-len(rows) // max_rows))
        shown = rows[::every] if rows[-1] in rows[::every] else [*rows[::every], rows[-1]]
        lines += ["| step | loss | learning rate | epoch |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['step']} | {_fmt(r['loss'])} | {r['learning_rate'] or 0:.2e} | {r['epoch'] or 0:.2f} |"
                  for r in shown]
        lines += ["", f"![training loss]({chart_uri})"]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def versions() -> dict[str, str]:
    return package_versions("codeclm-factory", "torch", "transformers", "trl", "peft", "datasets", "gguf", "litellm")


def publish_outputs(plan: FinetunePlan, out: Path, names: list[str]) -> None:
    """Hard-link (or copy, across file systems) the finished files into a staging dir, then publish it as `out`
    (codeclm.publish). A DIR that already holds this key's files is left alone."""
    manifest = out / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()).get("key") == plan.key and all(
            (out / n).exists() for n in names):
        return
    with publishing(out) as staging:
        for name in names:
            src = plan.work / name
            if src.is_dir():
                shutil.copytree(src, staging / name, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(src), str(staging / name))


def is_published(result: FinetuneResult) -> bool:
    """Whether `result.out` still holds this training's files."""
    manifest = Path(result.out) / MANIFEST
    try:
        return json.loads(manifest.read_text()).get("key") == result.key
    except (OSError, ValueError):
        return False


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)



def run_finetune(plan: FinetunePlan, settings: Settings, out: Path, on_progress: Listener) -> FinetuneResult:
    """Train (or reuse the finished training of) the plan's key, then publish its files into `out`. Two runs of
    one key take turns (a lock in its work directory): the second finds the first one's result."""
    plan.work.mkdir(parents=True, exist_ok=True)
    with (plan.work / ".lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if we die, even by SIGKILL
        try:
            result, cached = _trained(plan, settings, on_progress)
            files = [n for n in (LOCAL_FILES if plan.trainer == "local" else REMOTE_FILES) if (plan.work / n).exists()]
            publish_outputs(plan, out, files)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _at(result, out, cached)


def _trained(plan: FinetunePlan, settings: Settings, on_progress: Listener) -> tuple[FinetuneResult, bool]:
    result = done_result(plan)
    cached = result is not None
    if result is None:
        started = time.monotonic()
        result = _train_local(plan, settings, on_progress) if plan.trainer == "local" else \
            _train_remote(plan, settings, on_progress)
        result = result.model_copy(update={"seconds": round(time.monotonic() - started, 3)})
        manifest = {"key": plan.key, "trainer": plan.trainer, "created_at": datetime.now(UTC).isoformat(),
                    "base": {"name": plan.base.name, "kind": plan.base.kind, "location": plan.base.location,
                             "identity": plan.base.identity},
                    "data": {"path": str(plan.dataset.path), "sha256": plan.dataset.sha, "pairs": plan.dataset.pairs},
                    "hyperparameters": plan.hyperparameters, "versions": versions(),
                    "result": _relative(result)}
        write_json(plan.work / MANIFEST, manifest)
        mark_done(plan, result)
    return result, cached


def _relative(result: FinetuneResult) -> dict[str, Any]:
    """The result as DIR/manifest.json keeps it: model paths relative to DIR (the manifest is shared by links)."""
    data = result.model_dump(mode="json", exclude={"hyperparameters", "out", "cached"})
    data.update(merged_model="merged" if result.merged_model else None, adapter="adapter" if result.adapter else None)
    return data


def load_result(out: Path) -> FinetuneResult:
    """The result of the training published in `out`, read back from its manifest."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        raise ModelError(f"{out}: no fine-tuned model here (no readable {MANIFEST}); run `codeclm finetune`") from None
    data = {**manifest["result"], "out": str(out), "hyperparameters": manifest["hyperparameters"]}
    return _at(FinetuneResult.model_validate(data), out, cached=True)


def _at(result: FinetuneResult, out: Path, cached: bool) -> FinetuneResult:
    """The result with paths in the published directory (the work copy keeps its own), through its link, so they
    stay valid when a later publish replaces the version behind it."""
    out = out.absolute()
    return result.model_copy(update={
        "out": str(out), "cached": cached,
        "merged_model": str(out / "merged") if result.merged_model else None,
        "adapter": str(out / "adapter") if result.adapter else None})


def _train_local(plan: FinetunePlan, settings: Settings, on_progress: Listener) -> FinetuneResult:
    from codeclm.train import trainer_local

    outcome = trainer_local.train(plan, settings.finetune, settings.home, on_progress)
    write_log(plan.work / LOG_FILE, outcome.log)
    (plan.work / PLOT_FILE).write_text(loss_svg(outcome.log))
    losses = [r["loss"] for r in outcome.log]
    return FinetuneResult(
        out=str(plan.work), trainer="local", key=plan.key, data_sha=plan.dataset.sha, pairs=plan.dataset.pairs,
        base_model=plan.base.name, base_checkpoint=str(outcome.base_checkpoint), merged_model=str(outcome.merged),
        adapter=str(outcome.adapter) if outcome.adapter else None, served_name=plan.served_name,
        first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None, steps=outcome.steps,
        resumed_from_step=outcome.resumed_from_step, hyperparameters=plan.hyperparameters,
        device=outcome.device, precision=outcome.precision, preset=plan.preset, recipe=plan.recipe,
        prompt_format=outcome.prompt_format)


def _train_remote(plan: FinetunePlan, settings: Settings, on_progress: Listener) -> FinetuneResult:
    from codeclm.train import trainer_remote

    job = trainer_remote.train(plan, settings.finetune, lambda status, percent: on_progress(percent, 100, None))
    model = f"{settings.finetune.remote.provider}/{job['fine_tuned_model']}"
    return FinetuneResult(
        out=str(plan.work), trainer="remote", key=plan.key, data_sha=plan.dataset.sha, pairs=plan.dataset.pairs,
        base_model=plan.base.name, remote_model=model, remote_api_base=settings.finetune.remote.api_base,
        remote_job_id=job["job_id"], resumed_job=job["resumed"], served_name=job["fine_tuned_model"],
        recipe=plan.recipe, hyperparameters=plan.hyperparameters)
