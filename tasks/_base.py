"""What every CodecLM step task shares: Prefect defaults, and a `Step` that calls, records and writes.

Steps are idempotent on their own: outputs go to a content-addressed folder under the work dir and a
`_done.json` marker is written last, so a rerun (even one that misses Prefect's cache) returns at once,
and a batch killed midway pays only for the calls the gateway cache has not stored yet.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.tasks import exponential_backoff
from prefect.transactions import get_transaction
from typing_extensions import TypedDict  # pydantic (Prefect parameters) rejects typing.TypedDict on 3.11

from codeclm.errors import CodecError, ModelError
from codeclm.llm.gateway import Call, Result, gateway_for
from codeclm.records import CallStats, FailedCall, Record
from codeclm.settings import StageSettings
from codeclm.storage import read_records, write_json, write_records

R = TypeVar("R", bound=Record)


class Ref(TypedDict):
    """A Parquet file a task wrote: downstream cache keys hash `sha`, not the path."""

    path: str
    sha: str
    rows: int


Outputs = dict[str, Ref]


def _retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry infrastructure hiccups, never a user error (bad config, missing key, unreachable model)."""
    try:
        state.result()
    except CodecError:
        return False
    except Exception:
        return True
    return True


def codec_task(name: str, run_name: str = "{name} · batch {batch}", tags: Sequence[str] = (), retries: int = 2
               ) -> Callable[[Callable[..., Any]], Any]:
    """The house task decorator: cross-run cache on inputs (content hashes + the step's own settings, a
    `StageSettings` from `Settings.for_stage`), JSON results,
    retries that skip user errors, and a run name that says stage and batch."""
    return lambda fn: task(
        fn,
        name=name,
        task_run_name=run_name.replace("{name}", name),
        cache_policy=INPUTS + TASK_SOURCE,
        persist_result=True,
        result_serializer="json",
        cache_result_in_memory=False,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=2),
        retry_jitter_factor=0.5,
        retry_condition_fn=_retryable,
        tags=["codeclm", name, *tags],
    )


def read(ref: Ref, model: type[R]) -> list[R]:
    return read_records(Path(ref["path"]), model)


def ref_to(path: Path) -> Ref:
    import pyarrow.parquet as pq

    return Ref(path=str(path), sha=hashlib.sha256(path.read_bytes()).hexdigest(), rows=pq.read_metadata(path).num_rows)


def _abort_if_all_failed(stage: str, results: Sequence[Result]) -> None:
    """Every call failing for reasons other than the model's output means a broken model or endpoint: stop
    with that reason instead of publishing an empty dataset."""
    if results and not any(r.ok for r in results) and not any(
            r.error_type in ("ParseError", "Truncated") for r in results):
        first = results[0]
        raise ModelError(f"all {len(results)} {stage} calls to {first.model} failed; first error: "
                         f"{first.error_type}: {first.message[:200]}")


def _schemas_digest() -> str:
    """The Arrow schemas of every record type: part of each work folder's name, so outputs written under an
    older schema (a renamed column) are made again (from the call cache) instead of failing their schema check."""
    from codeclm import baseline_records, records
    from codeclm.eval import eval_records

    models = sorted({m for module in (records, eval_records, baseline_records) for m in vars(module).values()
                     if isinstance(m, type) and issubclass(m, Record) and m is not Record}, key=lambda m: m.__name__)
    text = "\n".join(f"{m.__name__}: {m.arrow_schema()}" for m in models)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


SCHEMAS = _schemas_digest()


class Step:
    """One run of a step over one batch: makes calls, collects failures and stats, writes outputs into a folder
    named by the step's own settings and inputs."""

    def __init__(self, stage: str, batch: str, settings: StageSettings, **inputs: Any) -> None:
        self.stage, self.batch, self.settings = stage, batch, settings
        fingerprint = json.dumps({"stage": stage, "batch": batch, "settings": settings.model_dump(mode="json"),
                                  "inputs": inputs, "schemas": SCHEMAS}, sort_keys=True, default=str)
        digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:20]
        self.dir = settings.work_dir / stage / f"{batch}-{digest}"
        self.failed: list[FailedCall] = []
        self.stats = CallStats(stage=stage, batch=batch)
        self.outputs: Outputs = {}
        self._started = time.monotonic()

    def structured(self, role: str) -> bool:
        """Whether the role answers in JSON (prompts then ask for JSON) or in the paper's plain-text formats."""
        return gateway_for(self.settings).endpoint(role).output_mode != "text"

    def done(self) -> Outputs | None:
        """The outputs of an earlier identical run, if it finished."""
        marker = self.dir / "_done.json"
        if not marker.exists():
            return None
        outputs: Outputs = json.loads(marker.read_text())
        return outputs if all(Path(r["path"]).exists() for r in outputs.values()) else None

    def call(self, calls: Sequence[Call], lineage: dict[str, str] | None = None) -> list[Result]:
        """Run calls through the gateway; failures become FailedCall rows (with the instruction they doom)."""
        results = gateway_for(self.settings).run(calls)
        _abort_if_all_failed(self.stage, results)
        for r in results:
            self.stats.calls += 1
            self.stats.cached += r.cached
            self.stats.attempts += r.attempts
            self.stats.prompt_tokens += r.prompt_tokens
            self.stats.completion_tokens += r.completion_tokens
            self.stats.cost_usd += r.cost_usd
            self.stats.unpriced_calls += r.unpriced and not r.cached
            self.stats.cache_unreadable += r.cache_unreadable
            if not r.ok:
                self.stats.failed += 1
                self.fail(r.call.item_id, r.call.role, r.model, r.error_type, r.message, r.attempts, r.text, r.key,
                          (lineage or {}).get(r.call.item_id))
        return results

    def fail(self, item_id: str, role: str, model: str, error_type: str, message: str, attempts: int = 0,
             raw_text: str | None = None, key: str = "", instruction_id: str | None = None) -> None:
        self.failed.append(FailedCall(stage=self.stage, item_id=item_id, instruction_id=instruction_id, role=role,
                                      model=model, error_type=error_type, message=message, attempts=attempts,
                                      raw_text=raw_text, call_key=key))

    def write(self, name: str, records: Sequence[Record], model: type[Record]) -> None:
        self.outputs[name] = ref_to(write_records(self.dir / f"{name}.parquet", records, model))

    def finish(self) -> Outputs:
        """Write outputs; only a batch without failed calls is marked done and cached by Prefect, so a rerun
        retries exactly the failed calls (the gateway cache answers the rest)."""
        self.stats.seconds = round(time.monotonic() - self._started, 3)
        self.write("failed", self.failed, FailedCall)
        self.write("stats", [self.stats], CallStats)
        if not self.failed:
            write_json(self.dir / "_done.json", self.outputs)
        elif (txn := get_transaction()) is not None:
            txn.write_on_commit = False
        return self.outputs
