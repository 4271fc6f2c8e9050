"""Serve tuned and base checkpoints to `evaluate`: an existing OpenAI-compatible server, started and stopped by
codeclm on loopback and tied to our process like the embedded one (codeclm.llm.embedded).

One server answers for several models, so base and tuned share one `api_base` (evaluate's targets differ only
in the model name): `transformers serve` (CPU or GPU) in HOME/serving, where each name is a symlink to a
merged Hugging Face checkpoint and is loaded on first use; `vllm serve BASE --enable-lora` with the LoRA adapters
where CUDA is present and vLLM is installed. The port is derived from the names (a free one if taken), so a
rerun usually gets the same `api_base` and the call cache, which keys on it, answers again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from codeclm.errors import ModelError
from codeclm.ops.processes import free_port, spawn, stop
from codeclm.settings import RoleConfig
from codeclm.train.finetune import INSTALL_HINT, FinetuneResult, cuda_available

log = logging.getLogger(__name__)
Backend = Literal["transformers", "vllm"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PORTS = (20000, 40000)  # where derived ports fall: above the usual services, below the ephemeral range


@dataclass(frozen=True)
class ServedModels:
    """A running server, the names it answers for, and how to call them through the gateway."""

    api_base: str
    names: tuple[str, ...]
    backend: Backend
    pid: int
    log: Path

    def model(self, name: str) -> str:
        """The litellm model string of a served name (OpenAI-compatible endpoint at `api_base`)."""
        if name not in self.names:
            raise ModelError(f"{name} is not served here; served: {', '.join(self.names)}")
        return f"openai/{name}"

    def role(self, name: str, **overrides: Any) -> RoleConfig:
        """A role config pointing at one served model (e.g. the target for `evaluate`)."""
        return RoleConfig(**{"model": self.model(name), "api_base": self.api_base, **overrides})


def pick_backend() -> Backend:
    """vLLM where CUDA is present and vLLM is installed; transformers serve everywhere else."""
    return "vllm" if cuda_available() and importlib.util.find_spec("vllm") is not None else "transformers"


@contextlib.contextmanager
def serve_finetuned(result: FinetuneResult, home: Path, base_name: str = "base-smollm2",
                    backend: Backend | None = None, startup_timeout: float = 300.0) -> Iterator[ServedModels]:
    """Base and tuned model of a local fine-tune on one server: `base_name` and `result.served_name`."""
    if not (result.base_checkpoint and result.merged_model):
        raise ModelError(f"{result.out}: no local checkpoints to serve (a remote model is served by its provider)")
    backend = backend or pick_backend()
    base = Path(result.base_checkpoint)
    if backend == "vllm" and result.adapter:
        with serve_models({base_name: base}, home, {result.served_name: Path(result.adapter)}, backend,
                          startup_timeout) as served:
            yield served
        return
    with serve_models({base_name: base, result.served_name: Path(result.merged_model)}, home, {}, backend,
                      startup_timeout) as served:
        yield served


@contextlib.contextmanager
def serve_models(models: Mapping[str, Path], home: Path, adapters: Mapping[str, Path] | None = None,
                 backend: Backend | None = None, startup_timeout: float = 300.0) -> Iterator[ServedModels]:
    """Serve checkpoints (name -> directory; with vLLM one base plus LoRA `adapters`) for the duration of the
    block. Every model answers once before this yields; the server dies with us and is stopped on exit."""
    adapters = dict(adapters or {})
    backend = backend or pick_backend()
    _check(models, adapters, backend)
    names = (*models, *adapters)
    port = _port(names)
    log_path = home / f"serving-{'-'.join(names)[:80]}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cwd = _links(home, models) if backend == "transformers" else home
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log_file:
        proc = spawn(_command(backend, models, adapters, port), cwd=cwd, env=env, stdout=log_file,
                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(proc, url, names, startup_timeout, log_path)
        log.info("%s serving %s at %s (pid %d)", backend, ", ".join(names), url, proc.pid)
        yield ServedModels(url, names, backend, proc.pid, log_path)
    finally:
        stop(proc, timeout=15)


def _check(models: Mapping[str, Path], adapters: Mapping[str, Path], backend: Backend) -> None:
    for name, path in [*models.items(), *adapters.items()]:
        if not _NAME.match(name):
            raise ModelError(f"serving name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
        marker = "adapter_config.json" if name in adapters else "config.json"
        if not (path / marker).is_file():
            raise ModelError(f"{path}: no {marker}; not a checkpoint to serve as {name}")
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ModelError("vLLM is not installed: pip install vllm (GPU machines only)")
        if len(models) != 1:
            raise ModelError(f"vLLM serves one base model (plus LoRA adapters); got {len(models)}")
    elif adapters:
        raise ModelError("transformers serve takes merged checkpoints, not LoRA adapters; serve DIR/merged")
    elif importlib.util.find_spec("transformers") is None or importlib.util.find_spec("fastapi") is None:
        raise ModelError(f"serving a tuned model needs transformers[serving]; {INSTALL_HINT}")


def _port(names: tuple[str, ...]) -> int:
    """A port derived from the served names, so the api_base (part of every call's cache key) repeats."""
    digest = int(hashlib.sha256("\n".join(names).encode()).hexdigest()[:8], 16)
    port = _PORTS[0] + digest % (_PORTS[1] - _PORTS[0])
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def _links(home: Path, models: Mapping[str, Path]) -> Path:
    """HOME/serving/<name> -> checkpoint: the relative names transformers serve resolves (replaced atomically)."""
    folder = home / "serving"
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in models.items():
        tmp = folder / f".{name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(path.resolve(), target_is_directory=True)
        os.replace(tmp, folder / name)
    return folder


def _command(backend: Backend, models: Mapping[str, Path], adapters: Mapping[str, Path], port: int) -> list[str]:
    if backend == "transformers":  # every model stays loaded once used (no idle unloading mid-evaluation)
        return [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1", "--port",
                str(port), "--model-timeout", "-1", "--log-level", "info"]
    (name, base), = models.items()
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(base), "--served-model-name", name, "--host",
           "127.0.0.1", "--port", str(port)]
    if adapters:
        rank = max(int(json.loads((p / "adapter_config.json").read_text()).get("r", 16)) for p in adapters.values())
        cmd += ["--enable-lora", "--max-lora-rank", str(max(8, rank)), "--lora-modules",
                *(f"{n}={p}" for n, p in adapters.items())]
    return cmd


def _wait_ready(proc: subprocess.Popen[bytes], url: str, names: tuple[str, ...], timeout: float,
                log_path: Path) -> None:
    """Up when every name answers a one-token chat request (transformers serve loads a model on first use, so
    this also loads them all, and a checkpoint that cannot load fails here, with the log to read)."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        if proc.poll() is not None:
            raise ModelError(f"the model server exited with code {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise ModelError(f"the model server did not answer for {pending[0]} within {timeout:.0f}s; "
                             f"see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.post(f"{url}/chat/completions", timeout=max(5.0, deadline - time.monotonic()), json={
                "model": pending[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
            if response.status_code == 200:
                pending.pop(0)
                continue
            if response.status_code not in (404, 502, 503):  # those: still starting up
                raise ModelError(f"the model server refused {pending[0]}: HTTP {response.status_code} "
                                 f"{response.text[:200]}; see {log_path}")
        time.sleep(0.5)
