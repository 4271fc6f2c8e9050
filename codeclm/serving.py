"""Serve a tuned (or base) checkpoint to `evaluate`: an existing OpenAI-compatible server, started and stopped
by codeclm on a free loopback port and tied to our process like the embedded one (codeclm.embedded).

`transformers serve` (CPU or GPU) pinned to one merged Hugging Face checkpoint; `vllm serve` with the LoRA adapter
where CUDA is present and vLLM is installed. The model answers under a short name (`ServedModel.model` is the
litellm string `openai/<name>`): transformers serve is started in HOME/serving, where `<name>` links to the
checkpoint, and pinned to that relative path, so requests name the model by `<name>` instead of a full path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from codeclm.embedded import _die_with_parent, _free_port
from codeclm.errors import ModelError
from codeclm.finetune import INSTALL_HINT
from codeclm.settings import RoleConfig

log = logging.getLogger(__name__)
Backend = Literal["transformers", "vllm"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ServedModel:
    """A running server and how to call it through the gateway."""

    name: str
    path: Path
    api_base: str
    backend: Backend
    pid: int
    log: Path

    @property
    def model(self) -> str:
        """The litellm model string (OpenAI-compatible endpoint at `api_base`)."""
        return f"openai/{self.name}"

    def role(self, **overrides: Any) -> RoleConfig:
        """A role config pointing at this server (e.g. the target for `evaluate`)."""
        return RoleConfig(**{"model": self.model, "api_base": self.api_base, **overrides})


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pick_backend() -> Backend:
    """vLLM where CUDA is present and vLLM is installed; transformers serve everywhere else."""
    return "vllm" if cuda_available() and importlib.util.find_spec("vllm") is not None else "transformers"


def _command(backend: Backend, name: str, model_dir: Path, adapter: Path | None, port: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if backend == "vllm":
        cmd = [str(bin_dir / "vllm"), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
        if adapter is None:
            return [*cmd, "--served-model-name", name]
        rank = int(json.loads((adapter / "adapter_config.json").read_text()).get("r", 16))
        return [*cmd, "--served-model-name", f"{name}-base", "--enable-lora", "--max-lora-rank",
                str(max(8, rank)), "--lora-modules", f"{name}={adapter}"]
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", name, "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "info"]


def _link(home: Path, name: str, model_dir: Path) -> Path:
    """HOME/serving/<name> -> the checkpoint: the name transformers serve is pinned to (replaced atomically)."""
    folder = home / "serving"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / name
    tmp = folder / f".{name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(model_dir.resolve(), target_is_directory=True)
    os.replace(tmp, link)
    return folder


@contextlib.contextmanager
def serve_model(model_dir: Path, name: str, home: Path, adapter: Path | None = None,
                backend: Backend | None = None, startup_timeout: float = 300.0) -> Iterator[ServedModel]:
    """Serve `model_dir` (a merged Hugging Face checkpoint; with vLLM, the base plus `adapter`) as `name` for the
    duration of the block; the server dies with us (PDEATHSIG) and is stopped on exit."""
    if not _NAME.match(name):
        raise ModelError(f"serving name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face checkpoint (no config.json); nothing to serve")
    backend = backend or pick_backend()
    if backend == "transformers" and (importlib.util.find_spec("transformers") is None
                                      or importlib.util.find_spec("fastapi") is None):
        raise ModelError(f"serving a tuned model needs transformers[serving]; {INSTALL_HINT}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ModelError("vLLM is not installed: pip install vllm (GPU machines only)")
    port = _free_port()
    cwd = _link(home, name, model_dir) if backend == "transformers" else home
    log_path = home / f"serving-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(_command(backend, name, model_dir, adapter, port), cwd=cwd, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(proc, url, name, startup_timeout, log_path)
        log.info("%s serving %s as %s at %s (pid %d)", backend, model_dir, name, url, proc.pid)
        yield ServedModel(name, model_dir, url, backend, proc.pid, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, name: str, timeout: float, log_path: Path) -> None:
    """Up when /v1/models lists the model (both servers load it before they listen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ModelError(f"the model server for {name} exited with code {proc.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = httpx.get(f"{url}/models", timeout=2.0)
            if response.status_code == 200 and name in {m.get("id") for m in response.json().get("data", [])}:
                return
        time.sleep(0.5)
    raise ModelError(f"the model server for {name} did not answer within {timeout:.0f}s; see {log_path}")
