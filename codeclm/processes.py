"""Child servers codeclm starts on loopback (llama.cpp, transformers serve, Prefect's temporary API): a free port,
a tie to our process so none outlives it (not after Ctrl-C, not after kill -9), and a polite then firm stop."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys

PR_SET_PDEATHSIG = 1  # prctl option: the signal a child receives when its parent dies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Runs in the child before exec (Popen's preexec_fn): the kernel sends it SIGTERM when we die (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; always reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
