"""The review gate, the paper's manual check (§4.1: the augmented metadata are checked by hand before decoding):
the flow run pauses on Prefect's own pause-for-input form, its description the metadata or the dataset's
profile, and goes on only when a reviewer approves it, in the UI or, when the run is interactive, here in the
terminal. Rejecting stops the run with nothing published or trained on; not answering in time does the same,
saying how to come back."""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout, NotPausedError
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run as runtime_flow_run
from pydantic import Field

from codeclm.errors import CodecError

log = logging.getLogger(__name__)
Gate = Literal["metadata", "dataset"]
POLL_S = 2  # how often a paused run asks the API whether it was resumed
FOREVER_S = 10 * 365 * 86400  # `review_timeout = None`: wait until answered (Prefect needs a number)
MAX_ASKS = 5  # a metadata review naming unknown ids is asked again, at most this often


class ReviewRejected(CodecError):
    """The reviewer rejected the metadata or the dataset: nothing was published or trained on."""


class ReviewPending(CodecError):
    """Nobody reviewed within `review_timeout`: nothing was published or trained on."""


class DatasetReview(RunInput):
    """The reviewer's answer on a dataset before it is published (or trained on)."""

    decision: Literal["approve", "reject"] = Field("approve", description="approve: publish it; reject: stop here, "
                                                   "nothing is published or trained on")
    reason: str = Field("", description="why (kept in the run's log); needed to reject")


class MetadataReview(DatasetReview):
    """The reviewer's answer on the augmented metadata, before any instruction is decoded from them."""

    drop_metadata_ids: str = Field("", description="metadata ids to leave out, separated by spaces or commas; "
                                   "the rest is decoded")

    def dropped(self) -> list[str]:
        return sorted({i for i in self.drop_metadata_ids.replace(",", " ").split() if i})


def parse_answer(line: str, gate: Gate) -> DatasetReview | None:
    """A terminal answer: `a` (approve), `r REASON` (reject), `d ID ...` (drop metadata ids); None if unclear."""
    word, _, rest = line.strip().partition(" ")
    word = word.lower()
    if word in ("a", "approve", "y", "yes"):
        return DatasetReview(decision="approve") if gate == "dataset" else MetadataReview(decision="approve")
    if word in ("r", "reject") and rest.strip():
        model = DatasetReview if gate == "dataset" else MetadataReview
        return model(decision="reject", reason=rest.strip())
    if word in ("d", "drop") and gate == "metadata" and rest.strip():
        return MetadataReview(decision="approve", drop_metadata_ids=rest.strip())
    return None


def _deployed() -> bool:
    """Whether this run (or the run it is a subflow of) was started from a deployment."""
    from prefect.runtime import deployment

    return bool(deployment.id or runtime_flow_run.parent_deployment_id)


def _interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


_lines: queue.Queue[str] = queue.Queue()
_reader: threading.Thread | None = None


def _read_lines() -> None:
    for line in sys.stdin:
        _lines.put(line)


def _next_line(answered: threading.Event) -> str | None:
    """The next terminal line, or None once the review was answered elsewhere. One reader thread serves every
    review of the process, so a line typed for a later review is never swallowed by an earlier one."""
    global _reader
    if _reader is None or not _reader.is_alive():
        _reader = threading.Thread(target=_read_lines, name="review-terminal", daemon=True)
        _reader.start()
    while not answered.is_set():
        with contextlib.suppress(queue.Empty):
            return _lines.get(timeout=0.5)
    return None


def _resume(run_id: Any, answer: DatasetReview, answered: threading.Event) -> None:
    """Hand the terminal's answer to the paused run; a run not paused yet (the form is being saved) is tried
    again until it is, or until the review was answered in the UI."""
    while not answered.is_set():
        try:
            resume_flow_run(run_id, run_input=answer.model_dump(mode="json"))
            return
        except (NotPausedError, RuntimeError):
            time.sleep(0.5)


def _terminal(run_id: Any, gate: Gate, show: Callable[[], None], answered: threading.Event) -> None:
    """Ask in the terminal while the run waits for the form; the first answer (here or in the UI) wins."""
    show()
    hint = "[a]pprove, [r]eject REASON" + (", [d]rop METADATA_ID ..." if gate == "metadata" else "")
    while not answered.is_set():
        sys.stdout.write(f"review the {gate} ({hint}; or answer the form in the Prefect UI): ")
        sys.stdout.flush()
        line = _next_line(answered)
        if line is None:
            return
        answer = parse_answer(line, gate)
        if answer is None:
            print(f"not understood: {line.strip()!r}")
            continue
        _resume(run_id, answer, answered)
        return


def ask(gate: Gate, description: str, timeout: float | None, show: Callable[[], None] | None = None,
        known_ids: set[str] | None = None) -> DatasetReview:
    """Pause this flow run until a reviewer answers; returns the approval (raises on rejection or no answer).
    `description` is the form's markdown; `show` prints the same for the terminal when the run is interactive;
    `known_ids` are the metadata ids a reviewer may drop (others are asked about again)."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("a review gate runs inside a flow run")
    model: type[DatasetReview] = MetadataReview if gate == "metadata" else DatasetReview
    note = ""
    for attempt in range(1, MAX_ASKS + 1):
        form = model.with_initial_data(description=note + description, decision="approve")
        url = runtime_flow_run.get_flow_run_ui_url() or f"flow run {context.flow_run.id}"
        log.warning("REVIEW: the run waits for a reviewer of the %s: answer the form at %s", gate, url)
        answered = threading.Event()
        if _interactive():
            threading.Thread(target=_terminal, args=(context.flow_run.id, gate, show or (lambda: None), answered),
                             daemon=True).start()
        try:
            answer = pause_flow_run(wait_for_input=form, timeout=int(timeout or FOREVER_S), poll_interval=POLL_S,
                                    key=f"review-{gate}-{attempt}")
        except FlowPauseTimeout:
            again = "start the deployment again with the same parameters" if _deployed() else \
                "run the same command again"
            raise ReviewPending(f"the {gate} was not reviewed within {timeout:g} s, so nothing was published or "
                                f"trained on; {again} to review it (every step before the review is reused, no call "
                                "is paid twice)") from None
        finally:
            answered.set()
        reason = answer.reason.strip()
        if answer.decision == "reject" and reason:
            raise ReviewRejected(f"the reviewer rejected the {gate}: {reason}; nothing was published or trained on")
        dropped = answer.dropped() if isinstance(answer, MetadataReview) else []
        unknown = sorted(set(dropped) - known_ids) if known_ids is not None else []
        if answer.decision == "reject":
            note = "> **Not done:** a rejection needs a reason; answer again.\n\n"
        elif unknown:
            note = f"> **Not done:** no metadata has the id(s) {', '.join(unknown)}; answer again.\n\n"
        else:
            log.warning("REVIEW: the %s was approved%s", gate, f" ({reason})" if reason else "")
            return answer
        log.warning("REVIEW: %s", note.strip("> \n").replace("**", ""))
    raise ReviewRejected(f"the {gate} review was answered {MAX_ASKS} times without a usable answer; nothing was "
                         "published or trained on")
