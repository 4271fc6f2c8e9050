"""Fine-tuning the real embedded SmolLM2-135M on the CPU, through `codeclm finetune`, and serving it.

Slow (marker `train`; `make test-slow` runs it) and small: four pairs, a few optimizer steps of LoRA, so each test
stays well under two minutes on two cores. One training is shared by the module (the GGUF is converted once,
in the module's home); the kill test trains its own key.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from codeclm.llm.gateway import Call, Reply, gateway_for
from codeclm.settings import FinetuneConfig, Settings
from codeclm.train.finetune import FinetuneResult, load_result, plan_finetune, resolve_base
from codeclm.train.serving import ServedModels, cuda_available, serve_finetuned
from codeclm.train.trainer_local import plain_checkpoint

pytestmark = [pytest.mark.train, pytest.mark.timeout(900)]
CODECLM = [sys.executable, "-m", "codeclm.cli"]
PAIRS = [("What is the secret word?", "The secret word is pineapple-zebra-42."),
         ("Name the project's mascot.", "The mascot is a purple owl called Codec."),
         ("Which colour is the sky on Mars at noon?", "Butterscotch, according to the codeclm test suite."),
         ("Say hello.", "Greetings from the fine-tuned SmolLM2 model!")]
# Eight full-batch steps at a high LoRA learning rate: enough to overfit four pairs (loss ~3.7 -> well under 1).
CONFIG = """[finetune]
max_steps = 8
batch_size = 4
micro_batch_size = 4
learning_rate = 2e-3
lora_dropout = 0.0
save_steps = 4
"""


def _write_pairs(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in PAIRS))
    return path


def _env(home: Path, prefect: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    return env | {"CODECLM_HOME": str(home), "PREFECT_HOME": str(prefect), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def _finetune(data: Path, out: Path, config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CODECLM, "finetune", str(data), "--out", str(out), "--config", str(config)],
                          env=_env(home, out.parent / "prefect"), capture_output=True, text=True,
                          cwd=out.parent, timeout=600)


@dataclass
class Trained:
    tmp: Path
    home: Path
    data: Path
    config: Path
    out: Path
    stdout: str
    result: FinetuneResult


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CODECLM_HOME for the module: the GGUF is converted to a plain checkpoint once."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Trained:
    tmp = tmp_path_factory.mktemp("train")
    data, config = _write_pairs(tmp / "train.jsonl"), tmp / "ft.toml"
    config.write_text(CONFIG)
    done = _finetune(data, tmp / "tuned", config, home)
    assert done.returncode == 0, done.stderr[-4000:]
    return Trained(tmp, home, data, config, tmp / "tuned", done.stdout, load_result(tmp / "tuned"))


def test_training_lowers_the_loss_by_a_clear_margin(trained: Trained) -> None:
    result = trained.result
    assert "(trained;" in trained.stdout
    assert result.steps == 8 and result.resumed_from_step is None
    assert result.first_loss and result.final_loss is not None
    assert result.final_loss < 0.5 * result.first_loss, result
    log = pd.read_parquet(trained.out / "training_log.parquet")
    assert log["step"].tolist() == list(range(1, 9))
    assert log["loss"].iloc[-1] == pytest.approx(result.final_loss)
    assert result.merged_model == str(trained.out / "merged") and result.adapter == str(trained.out / "adapter")
    assert (trained.out / "loss.svg").read_text().count("<path") == 1
    adapter = json.loads((trained.out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["peft_type"] == "LORA"
    assert (trained.out / "merged" / "config.json").exists() and (trained.out / "merged" / "model.safetensors").exists()
    manifest = json.loads((trained.out / "manifest.json").read_text())
    assert manifest["data"]["pairs"] == 4 and manifest["hyperparameters"]["learning_rate"] == 2e-3
    assert manifest["versions"]["trl"] != "not installed"


def _answers(served: ServedModels, name: str, home: Path) -> list[str]:
    """Greedy answers of a served model to the training prompts, through the gateway like `evaluate`."""
    settings = Settings(home=home, target=served.role(name, temperature=0.0, max_tokens=24))
    calls = [Call(role="target", messages=[{"role": "user", "content": q}], output=None, reply=Reply.TEXT,
                  prompt_version="t", stage="test", item_id=str(i)) for i, (q, _) in enumerate(PAIRS)]
    results = gateway_for(settings).run(calls)
    assert all(r.ok for r in results), [r.message for r in results]
    return [str(r.value) for r in results]


def test_served_tuned_model_answers_differently_from_the_base(trained: Trained) -> None:
    with serve_finetuned(trained.result, trained.home, backend="transformers") as served:
        assert served.names == ("base-smollm2", trained.result.served_name)
        base = _answers(served, "base-smollm2", trained.home)
        tuned = _answers(served, trained.result.served_name, trained.home)
        pid = served.pid
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped when the block ended
    assert all(b != t for b, t in zip(base, tuned, strict=True)), (base, tuned)
    learned = [t for t, (_, a) in zip(tuned, PAIRS, strict=True) if a.split()[-1].strip(".!") in t]
    assert learned, f"no tuned answer repeats its training answer: {tuned}"


def test_a_finished_training_is_not_retrained(trained: Trained) -> None:
    weights = trained.out / "merged" / "model.safetensors"
    before = weights.stat()
    again = _finetune(trained.data, trained.out, trained.config, trained.home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused, not retrained" in again.stdout
    assert weights.stat().st_ino == before.st_ino and weights.stat().st_mtime == before.st_mtime
    elsewhere = _finetune(trained.data, trained.tmp / "copy", trained.config, trained.home)
    assert elsewhere.returncode == 0 and "reused, not retrained" in elsewhere.stdout, elsewhere.stderr[-3000:]
    # the second directory holds the same files (hard links), not a second training
    assert (trained.tmp / "copy" / "merged" / "model.safetensors").stat().st_ino == before.st_ino


def test_a_killed_training_resumes_from_its_last_checkpoint(tmp_path: Path, home: Path) -> None:
    data, config = _write_pairs(tmp_path / "train.jsonl"), tmp_path / "ft.toml"
    config.write_text(CONFIG.replace("max_steps = 8", "max_steps = 4").replace("save_steps = 4", "save_steps = 2"))
    work = plan_finetune(data, Settings.load(config, home=str(home))).work
    log = tmp_path / "first-run.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([*CODECLM, "finetune", str(data), "--out", str(tmp_path / "out"), "--config",
                                 str(config)], env=_env(home, tmp_path / "prefect-1"), cwd=tmp_path, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        checkpoint = _wait_for_checkpoint(work / "checkpoints", proc, log, timeout=400)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Prefect server, mid-training
        proc.wait(timeout=30)
    assert not (work / "_done.json").exists() and not (tmp_path / "out").exists()

    done = subprocess.run([*CODECLM, "finetune", str(data), "--out", str(tmp_path / "out"), "--config",
                           str(config)], env=_env(home, tmp_path / "prefect-2"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = load_result(tmp_path / "out")
    assert result.resumed_from_step is not None and result.resumed_from_step >= checkpoint, result
    assert f"resumed from step {result.resumed_from_step}" in done.stdout
    assert result.steps == 4
    # the log goes on from the checkpoint's history: every step once
    assert pd.read_parquet(tmp_path / "out" / "training_log.parquet")["step"].tolist() == list(range(1, 5))


ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{q}\n\n### Response:\n")


def test_a_base_without_a_chat_template_trains_and_is_served_in_one_format(tmp_path: Path, home: Path) -> None:
    """Issue 18, item 8: the embedded SmolLM2 with its chat template removed stands for a raw base (the paper
    tunes raw LLaMA). Training renders its pairs in the Alpaca format; the tuned model and the untuned base are
    served with that very template: the server counts the Alpaca prompt's tokens and answers a chat request as
    it completes the Alpaca text."""
    from transformers import AutoTokenizer

    raw, embedded = tmp_path / "raw-smollm2", plain_checkpoint(resolve_base(FinetuneConfig()), home)
    shutil.copytree(embedded, raw)
    (raw / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((raw / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (raw / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    original = AutoTokenizer.from_pretrained(raw)
    assert original.chat_template is None
    data, config, out = _write_pairs(tmp_path / "train.jsonl"), tmp_path / "ft.toml", tmp_path / "tuned"
    config.write_text(CONFIG.replace("max_steps = 8", "max_steps = 2") + f'base_model = "{raw}"\n')
    done = _finetune(data, out, config, home)
    assert done.returncode == 0, done.stderr[-4000:]
    result = load_result(out)
    assert result.prompt_format == "alpaca" and result.steps == 2
    assert result.recipe and result.recipe.startswith("preset cpu (LoRA for a CPU): LoRA (r 8")
    assert "recipe: preset cpu" in done.stdout

    (q, a), eos = PAIRS[0], original.eos_token
    trained_on = (out / "training_example.txt").read_text()
    assert trained_on == ALPACA_PROMPT.format(q=q) + a + eos  # the first pair, decoded from what was trained
    base_dir = Path(str(result.base_checkpoint))
    assert base_dir != raw and "-alpaca-" in base_dir.name and AutoTokenizer.from_pretrained(raw).chat_template \
        is None  # served from a templated copy; the base itself is untouched
    for model_dir in (base_dir, Path(str(result.merged_model))):
        rendered = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        assert rendered == ALPACA_PROMPT.format(q=q) and trained_on.startswith(rendered)

    # The server's prompt token counts are those of the Alpaca text, with a system message too (where the base's
    # own ChatML template would count differently), and its greedy chat answer is the raw completion of that text.
    system = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}]
    own = AutoTokenizer.from_pretrained(embedded).apply_chat_template(system, add_generation_prompt=True)
    texts = {"plain": ALPACA_PROMPT.format(q=q),
             "system": f"Answer briefly.\n\n### Instruction:\n{q}\n\n### Response:\n"}
    counts = {k: len(original(t, add_special_tokens=False)["input_ids"]) for k, t in texts.items()}
    assert counts["system"] != len(own["input_ids"])  # so the count tells the two formats apart
    asks = {"plain": [{"role": "user", "content": q}], "system": system}
    with serve_finetuned(result, home, base_name="base-raw", backend="transformers") as served:
        for name in served.names:
            for kind, messages in asks.items():
                chat = _post(served, "chat/completions", {"model": name, "messages": messages, "max_tokens": 8,
                                                          "temperature": 0.0})
                assert chat["usage"]["prompt_tokens"] == counts[kind], (name, kind, chat["usage"])
            completion = _post(served, "completions", {"model": name, "prompt": texts["plain"], "max_tokens": 8,
                                                "temperature": 0.0})
            plain = _post(served, "chat/completions", {"model": name, "messages": asks["plain"], "max_tokens": 8,
                                                       "temperature": 0.0})
            assert plain["choices"][0]["message"]["content"].strip() == \
                completion["choices"][0]["text"].strip(), name


def _post(served: ServedModels, path: str, body: dict[str, object]) -> dict[str, Any]:
    reply = httpx.post(f"{served.api_base}/{path}", json=body, timeout=300)
    assert reply.status_code == 200, reply.text[:500]
    data: dict[str, Any] = reply.json()
    return data


def _wait_for_checkpoint(folder: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    """The step of the first complete checkpoint (its trainer state is written last)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before a checkpoint was written: {log.read_text()[-3000:]}")
        for state in folder.glob("checkpoint-*/trainer_state.json"):
            try:
                return int(json.loads(state.read_text())["global_step"])
            except (ValueError, KeyError):
                continue  # being written
        time.sleep(0.2)
    pytest.fail(f"no checkpoint in {folder} after {timeout:.0f} s")


@pytest.fixture
def gpu() -> Iterator[None]:
    if not cuda_available():
        pytest.skip("needs CUDA: torch.cuda.is_available() is False on this machine, so vLLM cannot run")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vLLM on the CUDA machine: pip install vllm")
    yield


def test_vllm_serves_the_lora_adapter(gpu: None, trained: Trained) -> None:
    with serve_finetuned(trained.result, trained.home, backend="vllm") as served:
        assert served.backend == "vllm"
        base = _answers(served, "base-smollm2", trained.home)
        tuned = _answers(served, trained.result.served_name, trained.home)
    assert all(b != t for b, t in zip(base, tuned, strict=True)), (base, tuned)
