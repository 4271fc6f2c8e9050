"""Child servers codeclm starts on loopback (llama.cpp, transformers serve, Prefect's temporary API): a free port,
a tie to our process so none outlives it (not after Ctrl-C, not after kill -9), and a polite then firm stop."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

PR_SET_PDEATHSIG = 1  # prctl option: the signal a child receives when its parent dies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent(parent: int | None = None) -> Callable[[], None]:
    """Popen's preexec_fn (runs in the child before exec): the kernel sends the child SIGTERM when we die (Linux).
    `parent` is our pid, captured before the fork: if we died before the tie was made, the child ends at once."""

    def tie() -> None:
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if parent is not None and os.getppid() != parent:
                os._exit(1)

    return tie


_Job = tuple[Callable[[], subprocess.Popen[Any]], Future[subprocess.Popen[Any]]]
_JOBS: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_SPAWNER_LOCK = threading.Lock()
_SPAWNER: list[threading.Thread] = []


def _spawner() -> None:
    while True:
        start, done = _JOBS.get()
        try:
            done.set_result(start())
        except BaseException as exc:
            done.set_exception(exc)


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a child server tied to this process. The kernel ties a child to the *thread* that forked it (it gets
    SIGTERM when that thread ends), so every tied child is forked by one daemon thread that lives as long as the
    process, never by a task thread that ends before the server should. The child gets a process group of its
    own: a terminal's Ctrl-C reaches codeclm alone, which records how the run ended before it stops its servers."""
    with _SPAWNER_LOCK:
        if not _SPAWNER:
            thread = threading.Thread(target=_spawner, name="codeclm-spawner", daemon=True)
            thread.start()
            _SPAWNER.append(thread)
    done: Future[subprocess.Popen[Any]] = Future()
    parent = os.getpid()
    _JOBS.put((lambda: subprocess.Popen(args, preexec_fn=die_with_parent(parent), process_group=0,
                                                  **kwargs), done))
    return done.result()


def stop(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; always reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
