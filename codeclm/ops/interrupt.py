"""Process-wide stop: a Ctrl-C, a SIGTERM, a Prefect cancellation or a dead model server ends every call in
flight at once, and every later call fails with the reason instead of retrying against something that is gone.
Completed calls stay in the call cache, so a rerun pays only for the rest."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from types import FrameType

from codeclm.errors import CodecError, ModelError

_STOPPED = threading.Event()
_REASON: list[CodecError] = []
_LOOPS: list[asyncio.AbstractEventLoop] = []
_LOCK = threading.RLock()  # re-entrant: a signal handler may call stop() while the main thread holds it
INTERRUPTED = "the run was interrupted; completed calls are cached"
RESUME = "interrupted: completed calls are cached; run the same command again to finish"
GRACE_S = 8.0  # after a signal, the process exits within this many seconds whatever is still running
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as a shell reports it
_SIGNALS: list[int] = []
_SAID: list[str] = []


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


def exit_code() -> int:
    """The exit code for the signal that stopped this process (130 for Ctrl-C, 143 for SIGTERM)."""
    return EXIT_CODES.get(signal.Signals(_SIGNALS[0]), 128 + _SIGNALS[0]) if _SIGNALS else 130


def say_once(line: str) -> None:
    """Write the closing line to stderr once, whoever gets there first (the CLI or the grace timer)."""
    with _LOCK:
        if _SAID:
            return
        _SAID.append(line)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def exit_now(code: int) -> None:
    """End the process at once (our child servers are tied to it: they stop as it goes)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _grace_over() -> None:
    say_once(RESUME)
    exit_now(exit_code())


def interrupted(signum: int) -> None:
    """A signal arrived (seen by our handler, or by the batch runner when Prefect's SIGTERM handler had it):
    cancel the calls first, so batch threads stop waiting for answers; as the `codeclm` program, also start a
    timer that ends the process if unwinding takes longer than GRACE_S."""
    with _LOCK:
        first = not _SIGNALS
        _SIGNALS.append(signum)
    stop()
    if first and _PROGRAM:
        timer = threading.Timer(GRACE_S, _grace_over)
        timer.daemon = True
        timer.start()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Stop, then unwind the main thread as Python and Prefect would (KeyboardInterrupt; Prefect's
    TerminationSignal, so a flow run ends Crashed with the reason). A later signal does not unwind again: a
    second Ctrl-C exits at once, and the SIGTERM Prefect hands back after marking the flow run is already
    being handled (Prefect re-raises it itself)."""
    if _SIGNALS:
        interrupted(signum)
        if signum == signal.SIGINT:
            _grace_over()
        return
    interrupted(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    from prefect.exceptions import TerminationSignal

    raise TerminationSignal(signal=signum)


_PROGRAM: list[bool] = []


def stop_on_signals() -> None:
    """As the `codeclm` program: SIGINT and SIGTERM stop the run promptly (`interrupted`). While a flow runs,
    Prefect owns SIGTERM; its exception unwinds through our task runner (codeclm.ops.batch_runner), which stops the
    calls, and Prefect hands the signal back to this handler once the flow run is marked. A signal ignored when
    we started (a background job's SIGINT, nohup) stays ignored."""
    _PROGRAM.append(True)
    for signum in EXIT_CODES:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
