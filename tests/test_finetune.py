"""The finetune step without training a model: settings and presets, the cache key, bad input through the CLI
(one line, exit 2, nothing published), and the remote trainer end to end against a loopback server that speaks
OpenAI's files and fine-tuning endpoints, on the real Prefect engine. Training the real model: test_train.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from codeclm.errors import ConfigError, DatasetError, ModelError
from codeclm.settings import FinetuneConfig, Settings
from codeclm.testing.fake_finetune import FakeFineTuneServer
from codeclm.train.finetune import (
    BaseRef,
    check_fits,
    hyperparameters,
    load_dataset,
    loss_svg,
    plan_finetune,
    report_markdown,
    resolve_base,
    training_key,
)

CODECLM = [sys.executable, "-m", "codeclm.cli"]
PAIRS = [("What is the secret word?", "The secret word is pineapple-zebra-42."),
         ("Name the project's mascot.", "The mascot is a purple owl called Codec.")]
BIG_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192}


def write_pairs(path: Path, pairs: list[tuple[str, str]] = PAIRS) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in pairs))
    return path


# -- settings ---------------------------------------------------------------------------------------------------

def test_cpu_preset_is_lora_and_paper_preset_follows_a4() -> None:
    cpu = Settings().finetune.hyper()
    assert (cpu.method, cpu.lora_r, cpu.lora_alpha, cpu.learning_rate, cpu.batch_size) == ("lora", 8, 16, 2e-4, 8)
    paper = FinetuneConfig(preset="paper").hyper()
    assert paper.method == "full"
    assert (paper.adam_beta1, paper.adam_beta2) == (0.9, 0.95)
    assert (paper.learning_rate, paper.min_learning_rate, paper.lr_schedule) == (1e-5, 1e-6, "linear")
    assert (paper.batch_size, paper.micro_batch_size, paper.epochs, paper.max_length) == (64, 8, 15.0, 2048)


def test_explicit_settings_override_the_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[finetune]\npreset = "paper"\nepochs = 2\n[finetune.remote]\npoll_seconds = 5\n')
    monkeypatch.setenv("CODECLM_FINETUNE__LEARNING_RATE", "3e-5")
    settings = Settings.load(config)
    hyper = settings.finetune.hyper()
    assert (hyper.method, hyper.epochs, hyper.learning_rate, hyper.adam_beta2) == ("full", 2.0, 3e-5, 0.95)
    assert settings.finetune.remote.poll_seconds == 5
    cli = settings.with_finetune(None, base_model="some/model", trainer="remote", preset=None)
    assert (cli.finetune.base_model, cli.finetune.trainer, cli.finetune.preset) == ("some/model", "remote", "paper")


def test_the_paper_preset_trains_with_the_a4_recipe_unless_finetune_says_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--preset paper` reaches `[finetune]` (issue 18, item 3); an explicit `[finetune] preset` still wins."""
    config = tmp_path / "c.toml"
    config.write_text("[finetune]\nepochs = 2\n")
    # built as `codeclm protocol` and `codeclm run` build it: flags, then the [finetune] flags
    paper = Settings.load(config, preset="paper").with_finetune(config, base_model="some/model", trainer=None)
    assert paper.finetune.preset == "paper"
    hyper = paper.finetune.hyper()
    assert (hyper.method, hyper.epochs, hyper.learning_rate, hyper.adam_beta2) == ("full", 2.0, 1e-5, 0.95)
    assert Settings(preset="paper").finetune.hyper() == FinetuneConfig(preset="paper").hyper()
    assert Settings(**paper.model_dump(mode="json")) == paper  # Prefect's parameter round trip keeps it
    config.write_text('[finetune]\npreset = "cpu"\n')
    assert Settings.load(config, preset="paper").finetune.hyper().method == "lora"  # the file's choice wins
    monkeypatch.setenv("CODECLM_FINETUNE__PRESET", "cpu")
    assert Settings(preset="paper").finetune.preset == "cpu"  # so does the environment's
    monkeypatch.delenv("CODECLM_FINETUNE__PRESET")
    assert Settings().finetune.preset == "cpu" and Settings(preset="default").finetune.preset == "cpu"


def test_the_recipe_is_named_in_one_line() -> None:
    from codeclm.train.finetune import describe_recipe

    assert describe_recipe(Settings(preset="paper")) == (
        "preset paper (A.4): full fine-tune, 15 epochs, lr 1e-05 linear to 1e-06, warmup 0, AdamW (0.9, 0.95), "
        "weight decay 0, batch 64 (8 per pass), max length 2048, gradient checkpointing")
    cpu = describe_recipe(FinetuneConfig(max_steps=2, batch_size=2, micro_batch_size=2))
    assert cpu.startswith("preset cpu (LoRA for a CPU): LoRA (r 8, alpha 16, dropout 0.05, all-linear), 2 steps, "
                          "lr 0.0002 linear to 0,")
    assert cpu.endswith("; set over the preset: max_steps, batch_size, micro_batch_size")
    assert describe_recipe(FinetuneConfig(trainer="remote", base_model="gpt-4o-mini")).startswith(
        "remote openai fine-tuning job on gpt-4o-mini: epochs auto")
    assert describe_recipe(FinetuneConfig(trainer="off")) == "no training (finetune.trainer = 'off')"


def test_a_full_fine_tune_without_cuda_is_announced() -> None:
    from codeclm.train.finetune import cuda_available, recipe_warning

    if cuda_available():
        pytest.skip("this machine has CUDA: the paper recipe runs where it is meant to")
    warning = recipe_warning(Settings(preset="paper"))
    assert warning and "full fine-tune without CUDA trains on the CPU" in warning
    assert recipe_warning(Settings()) is None
    assert recipe_warning(FinetuneConfig(preset="paper", trainer="remote", base_model="m")) is None


@pytest.mark.parametrize(("toml", "message"), [
    ("[finetune]\nbatch_size = 6\nmicro_batch_size = 4\n", "not a multiple of micro_batch_size"),
    ("[finetune]\nlearning_rate = 1e-5\nmin_learning_rate = 1e-4\n", "is above learning_rate"),
    ('[finetune]\ntrainer = "cloud"\n', "invalid setting finetune.trainer"),
    ('[finetune]\npreset = "gpu"\n', "invalid setting finetune.preset"),
    ("[finetune]\nlora_r = 0\n", "invalid setting finetune.lora_r"),
    ("[finetune]\nlearnig_rate = 1e-4\n", "invalid setting finetune.learnig_rate"),
])
def test_invalid_finetune_settings_name_the_setting(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        Settings.load(config)


# -- cache key --------------------------------------------------------------------------------------------------

def test_cache_key_changes_with_data_base_trainer_and_every_hyperparameter() -> None:
    base = BaseRef("m", "gguf", "/m.gguf", "gguf:abc")
    cfg = FinetuneConfig()
    key = training_key("sha1", base, "local", hyperparameters(cfg))
    assert key == training_key("sha1", base, "local", hyperparameters(FinetuneConfig()))
    # what does not change the trained model does not change the key
    same = FinetuneConfig(save_steps=3, threads=1, memory_limit_gb=2.0)
    assert training_key("sha1", base, "local", hyperparameters(same)) == key
    assert training_key("sha2", base, "local", hyperparameters(cfg)) != key
    assert training_key("sha1", BaseRef("m", "gguf", "/m.gguf", "gguf:def"), "local", hyperparameters(cfg)) != key
    assert training_key("sha1", base, "remote", hyperparameters(cfg)) != key
    changed = [FinetuneConfig(learning_rate=1e-3), FinetuneConfig(lora_r=16), FinetuneConfig(seed=1),
               FinetuneConfig(preset="paper"), FinetuneConfig(max_steps=10), FinetuneConfig(max_length=512)]
    keys = {training_key("sha1", base, "local", hyperparameters(c)) for c in changed}
    assert len(keys) == len(changed) and key not in keys


def test_plan_key_follows_the_dataset_content(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", finetune={"trainer": "remote", "base_model": "gpt-4o-mini"})
    first = plan_finetune(write_pairs(tmp_path / "a.jsonl"), settings)
    same = plan_finetune(write_pairs(tmp_path / "b.jsonl"), settings)  # same content, other path
    other = plan_finetune(write_pairs(tmp_path / "c.jsonl", PAIRS[:1]), settings)
    assert first.key == same.key != other.key
    assert first.dataset.sha == hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
    assert (first.dataset.pairs, other.dataset.pairs) == (2, 1)
    assert first.work == tmp_path / "home" / "finetune" / first.key[:20]


# -- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "message"), [
    ("", "no training pairs"),
    ("\n\n", "no training pairs"),
    ("{not json\n", "line 1 is not JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", "ends with the assistant's answer"),
    (json.dumps({"prompt": "hi", "completion": "yo"}) + "\n", "expected {\"messages\""),
])
def test_bad_datasets_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path)  # a dataset directory is read through its train.jsonl


@pytest.mark.parametrize(("base", "message"), [
    ("/nowhere/model.gguf", "no such GGUF file"),
    ("no-such-model", "not found"),
    ("./models/missing", "not found"),
])
def test_missing_base_models_are_refused(base: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        resolve_base(FinetuneConfig(base_model=base))


def test_remote_trainer_needs_a_provider_model() -> None:
    with pytest.raises(ConfigError, match="remote trainer needs the provider's model"):
        resolve_base(FinetuneConfig(trainer="remote"))


def test_a_model_too_large_is_refused_with_the_estimate() -> None:
    base = BaseRef("big", "checkpoint", "/big", "checkpoint:x")
    with pytest.raises(ModelError, match=r"7\.00B parameters: full fine-tuning needs about 140\.0 GB"):
        check_fits(base, 7_000_000_000, FinetuneConfig(preset="paper", memory_limit_gb=24))
    check_fits(base, 135_000_000, FinetuneConfig(memory_limit_gb=24))  # SmolLM2 + LoRA fits


def _cli(tmp: Path, args: list[str], prelude: str = "") -> subprocess.CompletedProcess[str]:
    """`codeclm finetune ARGS` in a subprocess with its own homes; `prelude` runs first (to break an import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "CODECLM_"))}
    env |= {"CODECLM_HOME": str(tmp / "home"), "PREFECT_HOME": str(tmp / "prefect")}
    code = f"import sys\n{prelude}\nfrom codeclm.cli import main\nsys.argv = ['codeclm', 'finetune', *{args!r}]\nmain()"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True, timeout=180)


def _big_checkpoint(tmp: Path) -> list[str]:
    folder = tmp / "big-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BIG_LLAMA))  # a 70B config and no weights: nothing can load
    return [str(write_pairs(tmp / "train.jsonl")), "--base", str(folder)]


CLI_CASES: dict[str, tuple[Any, str, str]] = {
    "no pairs": (lambda tmp: [str(_touch(tmp / "train.jsonl"))], "", "no training pairs"),
    "missing dataset": (lambda tmp: [str(tmp / "nope")], "", "nope: no such file"),
    "missing base model": (lambda tmp: [str(write_pairs(tmp / "t.jsonl")), "--base", str(tmp / "m.gguf")], "",
                           "no such GGUF file"),
    "extra not installed": (lambda tmp: [str(write_pairs(tmp / "t.jsonl"))], "sys.modules['trl'] = None",
                            "needs trl, which is not installed; install the train extra: pip install -e '.[train]'"),
    "model too large": (_big_checkpoint, "", "B parameters: lora fine-tuning needs about"),
    # --preset paper reaches [finetune]: the paper's recipe is a full fine-tune, checked as one
    "paper recipe too large": (lambda tmp: [*_big_checkpoint(tmp), "--preset", "paper"], "",
                               "B parameters: full fine-tuning needs about"),
}


def _touch(path: Path) -> Path:
    path.touch()
    return path


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_line_exit_2_and_publishes_nothing(tmp_path: Path, case: str) -> None:
    make, prelude, message = CLI_CASES[case]
    done = _cli(tmp_path, [*make(tmp_path), "--out", str(tmp_path / "out")], prelude)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "home" / "finetune").exists()  # nothing trained, converted or recorded
    assert not (tmp_path / "prefect" / "prefect.db").exists()  # refused before Prefect started


# -- report -----------------------------------------------------------------------------------------------------

def test_loss_report_has_a_thinned_table_and_the_chart() -> None:
    from codeclm.eval.eval_report import data_uri
    from codeclm.train.finetune import FinetuneResult

    rows = [{"step": s, "loss": 4.0 / s, "learning_rate": 1e-3, "epoch": s / 10} for s in range(1, 51)]
    result = FinetuneResult(out="/o", trainer="local", key="k", data_sha="d" * 64, pairs=4, base_model="b",
                            served_name="tuned-k", first_loss=4.0, final_loss=0.08, steps=50, hyperparameters={})
    svg = loss_svg(rows)
    text = report_markdown(result, rows, data_uri(svg))
    table = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert 10 <= len(table) <= 21 and table[0].startswith("| 1 | 4.0000") and table[-1].startswith("| 50 | 0.0800")
    assert "data:image/svg+xml;base64," in text and "loss 4.0000 → 0.0800" in text
    assert svg.count("<path") == 1 and svg.startswith("<svg")


# -- remote trainer ---------------------------------------------------------------------------------------------

def _remote_settings(tmp: Path, server: FakeFineTuneServer, **remote: Any) -> Settings:
    return Settings(home=tmp / "home", finetune={
        "trainer": "remote", "base_model": "gpt-4o-mini-2024-07-18",
        "remote": {"api_base": server.url, "api_key_env": "CODECLM_TEST_FT_KEY", "poll_seconds": 0.05, **remote}})


@pytest.fixture
def ft_server(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("CODECLM_TEST_FT_KEY", "sk-test")
    with FakeFineTuneServer() as server:
        yield server


def test_remote_trainer_uploads_once_creates_once_and_reruns_resume(
        tmp_path: Path, ft_server: FakeFineTuneServer, prefect_harness: None) -> None:
    from codeclm.llm.gateway import Call, Reply, gateway_for
    from flows.finetune import finetune

    data = write_pairs(tmp_path / "train.jsonl")
    settings = _remote_settings(tmp_path, ft_server)
    out = tmp_path / "tuned"
    first = finetune(str(data), str(out), settings)
    assert first.trainer == "remote" and not first.cached and not first.resumed_job
    assert first.remote_model and first.remote_model.startswith("openai/ft:gpt-4o-mini-2024-07-18:")
    assert first.remote_api_base == ft_server.url
    assert first.recipe and first.recipe.startswith("remote openai fine-tuning job on gpt-4o-mini-2024-07-18")
    assert (ft_server.count("POST /files"), ft_server.count("POST /fine_tuning/jobs")) == (1, 1)
    job = ft_server.jobs[first.remote_job_id or ""]
    assert job["status"] == "succeeded" and ft_server.file_bytes[job["training_file"]] == data.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["sha256"] == first.data_sha and manifest["key"] == first.key
    assert manifest["result"]["recipe"] == first.recipe  # the record names the recipe (protocol.json shows it)
    assert json.loads((out / "job.json").read_text())["job_id"] == first.remote_job_id

    # the job's model is a target like any other: ask it through the gateway
    target = Settings(home=tmp_path / "home", target={"model": first.remote_model, "api_base": first.remote_api_base})
    answer = gateway_for(target).run([Call(role="target", messages=[{"role": "user", "content": "hi"}], output=None,
                                           reply=Reply.TEXT, prompt_version="t", stage="test", item_id="1")])[0]
    assert answer.ok and ft_server.requests[-1]["model"] == first.remote_model.removeprefix("openai/")

    again = finetune(str(data), str(out), settings)  # Prefect's cache, or the finished key
    assert again.remote_model == first.remote_model and again.cached
    # lose every local trace (another machine, a wiped home): the provider's lists still find file and job
    work = settings.home / "finetune" / first.key[:20]
    for name in ("_done.json", "job.json"):
        (work / name).unlink()
    found = _run_fresh(data, tmp_path / "tuned2", settings)
    assert found.remote_job_id == first.remote_job_id and found.resumed_job and not found.cached
    assert (ft_server.count("POST /files"), ft_server.count("POST /fine_tuning/jobs")) == (1, 1)


def _run_fresh(data: Path, out: Path, settings: Settings) -> Any:
    """The flow with Prefect's cache bypassed, so only the trainer's own records can prevent a second job."""
    from tasks.finetune import finetune as task

    plan = plan_finetune(data, settings)
    return task.with_options(refresh_cache=True)(str(data), plan.dataset.sha, str(out), settings)


def test_remote_job_still_running_is_followed_by_the_rerun(
        tmp_path: Path, ft_server: FakeFineTuneServer, prefect_harness: None) -> None:
    from flows.finetune import finetune

    data = write_pairs(tmp_path / "train.jsonl")
    impatient = _remote_settings(tmp_path, ft_server, timeout_hours=1e-9)
    with pytest.raises(ModelError, match=r"is still validating_files after .* run the same command again"):
        finetune(str(data), str(tmp_path / "out"), impatient)
    assert not (tmp_path / "out").exists()
    result = finetune(str(data), str(tmp_path / "out"), _remote_settings(tmp_path, ft_server))
    assert result.resumed_job and result.remote_model
    assert (ft_server.count("POST /files"), ft_server.count("POST /fine_tuning/jobs")) == (1, 1)


def test_failed_remote_job_publishes_nothing_and_a_rerun_starts_a_new_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> None:
    from flows.finetune import finetune

    monkeypatch.setenv("CODECLM_TEST_FT_KEY", "sk-test")
    data = write_pairs(tmp_path / "train.jsonl")
    with FakeFineTuneServer(fail_jobs=True) as server:
        settings = _remote_settings(tmp_path, server)
        with pytest.raises(ModelError, match="failed: injected failure; nothing was published"):
            finetune(str(data), str(tmp_path / "out"), settings)
        assert not (tmp_path / "out").exists()
        server.fail_jobs = False
        result = finetune(str(data), str(tmp_path / "out"), settings)
        assert result.remote_model and not result.resumed_job
        assert (server.count("POST /files"), server.count("POST /fine_tuning/jobs")) == (1, 2)


def test_remote_trainer_without_its_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from codeclm.train.finetune import run_finetune

    monkeypatch.delenv("CODECLM_TEST_FT_KEY", raising=False)
    with FakeFineTuneServer() as server:
        settings = _remote_settings(tmp_path, server)
        plan = plan_finetune(write_pairs(tmp_path / "train.jsonl"), settings)
        with pytest.raises(ModelError, match="env var CODECLM_TEST_FT_KEY is not set"):
            run_finetune(plan, settings, tmp_path / "out", lambda *a: None)
        assert server.ops == []


# -- the prompt format of a base without a chat template (issue 18, item 8) ---------------------------------------

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{q}\n\n### Response:\n")


def _raw_tokenizer(bos: bool) -> Any:
    """A real (word-level) fast tokenizer with no chat template, as a raw base model ships; `bos`: it starts
    every text with <s>, as LLaMA's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = (ALPACA_PROMPT.format(q="What is the secret word?") + " ".join(a for _, a in PAIRS)).split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<s>", "</s>", "<unk>", *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("bos", [False, True])
def test_a_base_without_a_chat_template_gets_the_alpaca_format(bos: bool) -> None:
    from codeclm.train.prompt_format import ALPACA, OWN, ensure_template

    tokenizer = _raw_tokenizer(bos)
    assert tokenizer.chat_template is None
    assert ensure_template(tokenizer) == ALPACA
    (q, a), start = PAIRS[0], "<s>" if bos else ""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True)
    pair = tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                         tokenize=False)
    assert prompt == start + ALPACA_PROMPT.format(q=q)  # what a server renders for the question
    assert pair == prompt + a + "</s>"  # what training renders: the prompt, then the answer and EOS
    system = tokenizer.apply_chat_template([{"role": "system", "content": "Answer briefly."},
                                            {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    assert system == f"{start}Answer briefly.\n\n### Instruction:\n{q}\n\n### Response:\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == (1 if bos else 0) and (ids[0] == 0) is bos  # one BOS, first
    assert ensure_template(tokenizer) == OWN  # now it has one: kept as it is
    assert tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                         add_generation_prompt=True) == prompt


def test_the_served_base_carries_the_template_and_links_the_weights(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from codeclm.train.prompt_format import ensure_template, templated_base

    base = tmp_path / "raw-base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    (base / "model.safetensors").write_bytes(b"weights")
    _raw_tokenizer(bos=True).save_pretrained(base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(base)
    ensure_template(tokenizer)
    served = templated_base(base, tokenizer, tmp_path / "home", "checkpoint:abc")
    assert served.parent == tmp_path / "home" / "finetune" / "base"
    assert (served / "model.safetensors").is_symlink() and (served / "model.safetensors").resolve() == \
        base / "model.safetensors"  # no weights copied
    assert AutoTokenizer.from_pretrained(served).chat_template == tokenizer.chat_template
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before  # the base itself is never written to
    assert templated_base(base, tokenizer, tmp_path / "home", "checkpoint:abc") == served  # made once


def test_a_local_training_key_holds_the_prompt_format(monkeypatch: pytest.MonkeyPatch) -> None:
    from codeclm.train import finetune

    base, hyper = BaseRef("m", "checkpoint", "/m", "checkpoint:x"), hyperparameters(FinetuneConfig())
    local, remote = training_key("sha", base, "local", hyper), training_key("sha", base, "remote", hyper)
    monkeypatch.setattr(finetune, "template_digest", lambda: "another template")
    assert training_key("sha", base, "local", hyper) != local
    assert training_key("sha", base, "remote", hyper) == remote  # a provider job uses the provider's format
