"""A Prefect cancellation (the UI's Cancel button, `prefect flow-run cancel`) honoured by a run started in-process.

A deployment's run is cancelled by its worker: it sends the flow's process SIGTERM, which stops our calls
(codeclm.ops.batch_runner) and ends the run Cancelled. A run started by `codeclm generate` or a script has no worker
(Prefect: "a monitoring process must be running to enforce the cancellation"), so Cancel would only relabel it
while it ran on. Here the top-level flow run watches its own state and, once it is Cancelling, does what a worker
does: records the intent (so Prefect ends the run Cancelled, not Crashed) and sends this process SIGTERM. The same
watcher first records which process runs the run and marks Crashed the runs that killed processes left Running
(codeclm.ops.run_owner).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import threading
from typing import Any

from codeclm.errors import ModelError
from codeclm.ops import interrupt, run_owner

log = logging.getLogger(__name__)
POLL_S = 2.0
CANCELLED = "the run was cancelled in Prefect; completed calls are cached"


def watch_cancellation(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow `on_running` hook: watch a top-level run that no worker watches (no deployment)."""
    if flow_run.deployment_id is not None or flow_run.parent_task_run_id is not None:
        return
    context = contextvars.copy_context()  # Prefect's settings (which API server) live in context variables
    threading.Thread(target=context.run, args=(_watch, flow_run.id), name="codeclm-cancel-watch",
                     daemon=True).start()


def _watch(run_id: Any) -> None:
    from prefect.client.orchestration import get_client

    stop = threading.Event()
    with get_client(sync_client=True) as client:
        try:  # who runs this run, and which runs were left Running by a process that is gone (run_owner)
            run_owner.claim(client, run_id)
            run_owner.crash_orphans(client)
        except Exception as exc:  # bookkeeping only: never a reason to stop the run
            log.warning("could not check for flow runs left Running by a killed process: %s", exc)
        while not stop.wait(POLL_S):
            try:
                state = client.read_flow_run(run_id).state
            except Exception as exc:  # the API went away: the run is over, or it reports its own failure
                log.debug("cancellation watch of %s ended: %s", run_id, exc)
                return
            if state is None:
                continue
            if state.is_cancelling() or state.is_cancelled():
                _cancel()
                return
            if state.is_final():
                return


def _cancel() -> None:
    """What a Prefect worker does to cancel a run, in this process."""
    log.warning("flow run cancelled in Prefect: stopping")
    interrupt.stop(ModelError(CANCELLED))
    with contextlib.suppress(ImportError, AttributeError):  # Prefect's runner sets this intent (prefect 3.9)
        from prefect._internal import control_listener

        control_listener._set_intent("cancel")
    os.kill(os.getpid(), signal.SIGTERM)
