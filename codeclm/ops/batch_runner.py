"""The thread pool that runs batch tasks, and stops their LLM calls when the flow is interrupted.

Prefect's ThreadPoolTaskRunner joins its threads on the way out; a batch thread blocked on a hung call would hold
the process until the call's last attempt timed out (minutes). Leaving on a signal (Ctrl-C, SIGTERM, a worker
cancelling the run) first ends every call in flight, so each batch task fails at once with "interrupted" and the
join is quick. Completed calls stay in the call cache.
"""

from __future__ import annotations

import signal
from typing import Any

from prefect.exceptions import TerminationSignal
from prefect.task_runners import ThreadPoolTaskRunner

from codeclm.ops import interrupt


class BatchRunner(ThreadPoolTaskRunner):  # type: ignore[type-arg]
    """ThreadPoolTaskRunner that stops the calls before joining threads after KeyboardInterrupt, SystemExit or
    Prefect's TerminationSignal (every BaseException that is not an Exception)."""

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if isinstance(exc_value, KeyboardInterrupt):
            interrupt.interrupted(signal.SIGINT)
        elif isinstance(exc_value, TerminationSignal):
            interrupt.interrupted(exc_value.signal)
        elif exc_type is not None and not issubclass(exc_type, Exception):
            interrupt.stop()
        super().__exit__(exc_type, exc_value, traceback)
