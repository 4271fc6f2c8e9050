"""Process-wide stop: a Ctrl-C, a SIGTERM or a dead model server ends every call in flight at once, and every
later call fails with the reason instead of retrying against something that is gone. Completed calls stay
in the call cache, so a rerun pays only for the rest."""

from __future__ import annotations

import asyncio
import threading

from codeclm.errors import CodecError, ModelError

_STOPPED = threading.Event()
_REASON: list[CodecError] = []
_LOOPS: list[asyncio.AbstractEventLoop] = []
_LOCK = threading.Lock()
INTERRUPTED = "the run was interrupted; completed calls are cached"


def register_loop(loop: asyncio.AbstractEventLoop) -> None:
    """An event loop whose tasks a stop cancels (the gateway's call loop)."""
    with _LOCK:
        _LOOPS.append(loop)


def stop(reason: CodecError | None = None) -> None:
    """Cancel every call in flight and refuse new ones; the first reason given is the one reported."""
    with _LOCK:
        if reason is not None and not _REASON:
            _REASON.append(reason)
        _STOPPED.set()
        loops = list(_LOOPS)
    for loop in loops:
        if loop.is_running():
            loop.call_soon_threadsafe(lambda lp=loop: [t.cancel() for t in asyncio.all_tasks(lp)])


def stopped() -> bool:
    return _STOPPED.is_set()


def raise_if_stopped() -> None:
    """Raise the stop's reason (a CodecError: the CLI prints it as one line, Prefect does not retry it)."""
    if _STOPPED.is_set():
        with _LOCK:
            raise _REASON[0] if _REASON else ModelError(INTERRUPTED)


def reset() -> None:
    """Forget an earlier stop (a new run in the same process, e.g. a test)."""
    with _LOCK:
        _STOPPED.clear()
        _REASON.clear()
