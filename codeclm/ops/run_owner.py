"""Flow runs whose process died without a word (kill -9, the OOM killer, a power cut) end Crashed, not Running for ever.

A deployment's run has a worker and Prefect's heartbeats to tell that its process is gone; a run that `codeclm`
started itself on a persistent server has neither, and Prefect's database kept it Running. So each top-level run
records which process runs it (Prefect's `infrastructure_pid` field: `codeclm:<host>:<boot>:<pid>:<start>`, where
the boot id and the process start time tell a dead process from a later one with the same pid), and the next
codeclm run that starts on the same host marks every Running run whose process is gone Crashed, with its subflows.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
PREFIX = "codeclm"
GONE = ("the process that ran it ({owner}) ended without reporting (kill -9, out of memory, power loss); marked "
        "Crashed by the next codeclm run on this host")
LOOK_AT = 200  # most recent unfinished top-level runs examined at each start


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "noboot"


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks after boot (None: no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@cache
def owner_token() -> str:
    """This process, as recorded on the runs it starts."""
    pid = os.getpid()
    return f"{PREFIX}:{socket.gethostname()}:{_boot_id()}:{pid}:{_started(pid)}"


def owner_gone(token: str | None) -> bool:
    """Whether `token` names a codeclm process of this host that no longer runs (False when it cannot be told:
    another host, another program, no /proc)."""
    parts = (token or "").split(":")
    if len(parts) != 5 or parts[0] != PREFIX or parts[1] != socket.gethostname():
        return False
    _, _, boot, pid, started = parts
    if boot != _boot_id():
        return True  # the machine restarted since
    return _started(int(pid)) != started


def claim(client: Any, run_id: Any) -> None:
    """Record this process as the one running flow run `run_id`."""
    client.update_flow_run(run_id, infrastructure_pid=owner_token())


def crash_orphans(client: Any) -> list[str]:
    """Mark Crashed every unfinished top-level run (and its unfinished subflows) whose codeclm process is gone;
    returns their ids."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterParentTaskRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    unfinished = FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]))
    top = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        state=unfinished, parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)), limit=LOOK_AT)
    crashed: list[str] = []
    for run in top:
        if not owner_gone(run.infrastructure_pid):
            continue
        message = GONE.format(owner=run.infrastructure_pid.split(":", 1)[1])
        family, todo = [run], [run.id]
        while todo:  # its subflows, however deep
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[todo.pop()])))
            family += children
            todo += [c.id for c in children]
        for member in family:
            if member.state is not None and not member.state.is_final():
                client.set_flow_run_state(member.id, Crashed(message=message), force=True)
                crashed.append(str(member.id))
        log.warning("flow run %s (%s) was left Running by a process that is gone; marked Crashed", run.name, run.id)
    return crashed
