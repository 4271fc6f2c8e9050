"""What every LLM caller in a process shares: litellm (imported once, on first use) and the one event loop its
async clients are bound to.

Why process-wide: importing litellm costs seconds, and litellm binds its logging worker and connection pools
to the loop it first sees, so a loop per caller left a pending worker behind per caller ("Task was destroyed").
The gateway, the remote trainer and anything else that awaits litellm run their coroutines here.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from codeclm.ops import interrupt

V = TypeVar("V")
_LOOP_LOCK = threading.Lock()
_LOOP: asyncio.AbstractEventLoop | None = None


def litellm() -> Any:
    """litellm, imported on first use: it costs seconds, and `codeclm --help` or a rerun must not pay for it."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm as module

    module.suppress_debug_info = True
    module.drop_params = True
    return module


def import_in_background() -> None:
    """Start litellm's import in a thread, so it overlaps other start-up work (Prefect's server, the checks);
    a later `litellm()` waits on Python's import lock instead of importing again."""
    threading.Thread(target=litellm, name="import-litellm", daemon=True).start()


def call_loop() -> asyncio.AbstractEventLoop:
    """The one background event loop of this process for LLM calls (started on first use; a Ctrl-C or a stop
    cancels its tasks, see codeclm.ops.interrupt)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="codeclm-llm", daemon=True).start()
            interrupt.register_loop(_LOOP)
        return _LOOP


def run_on_call_loop(coro: Coroutine[Any, Any, V]) -> V:
    """Run a coroutine on the call loop from any other thread and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, call_loop()).result()
