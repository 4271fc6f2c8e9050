"""The remote trainer: an OpenAI-style fine-tuning job through litellm's files and fine-tuning API.

Upload train.jsonl (named by its sha256), create a job (suffix named by the training key), poll it. Nothing is
paid for twice: the file and job ids are recorded in WORK/job.json as soon as they exist, and without a record
the provider's own lists are searched for the file name and the job's suffix or training file, so a rerun (after
a kill, a timeout or on another machine sharing HOME) follows the running or finished job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from codeclm.errors import ModelError
from codeclm.llm import llm_runtime
from codeclm.settings import FinetuneConfig
from codeclm.storage import write_json
from codeclm.train.training_plan import FinetunePlan

log = logging.getLogger(__name__)
JOB_FILE = "job.json"
StatusListener = Callable[[str, int], None]  # (job status, percent)
_PERCENT = {"validating_files": 10, "queued": 20, "running": 50, "succeeded": 100, "failed": 100, "cancelled": 100}
_DEAD = ("failed", "cancelled")


def _items(page: Any) -> list[Any]:
    return list(getattr(page, "data", None) or [])


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


class RemoteJob:
    """One training key's job at the provider, with its local record."""

    def __init__(self, plan: FinetunePlan, cfg: FinetuneConfig) -> None:
        self.plan, self.cfg, self.remote = plan, cfg, cfg.remote
        self.record_path = plan.work / JOB_FILE
        self.record: dict[str, Any] = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        self.filename = f"codeclm-{plan.dataset.sha[:16]}.jsonl"
        self.suffix = f"codeclm-{plan.key[:10]}"  # OpenAI allows 18 characters on older models
        key = None
        if self.remote.api_key_env:
            key = os.environ.get(self.remote.api_key_env)
            if not key:
                raise ModelError(f"remote trainer: env var {self.remote.api_key_env} is not set; export the key")
        self.kwargs: dict[str, Any] = {"custom_llm_provider": self.remote.provider, "api_key": key or "sk-none"}
        if self.remote.api_base:
            self.kwargs["api_base"] = self.remote.api_base

    def _save(self, **values: Any) -> None:
        self.record.update(values)
        write_json(self.record_path, self.record)

    async def file_id(self) -> str:
        """The uploaded training file: recorded, found by name at the provider, or uploaded now."""
        if self.record.get("file_id"):
            return str(self.record["file_id"])
        litellm = llm_runtime.litellm()
        listed = await litellm.afile_list(purpose="fine-tune", **self.kwargs)
        found = next((f for f in _items(listed) if _get(f, "filename") == self.filename
                      and _get(f, "status") not in ("error", "deleted")), None)
        if found is None:
            content = self.plan.dataset.path.read_bytes()
            found = await litellm.acreate_file(file=(self.filename, content, "application/jsonl"),
                                               purpose="fine-tune", **self.kwargs)
            log.info("uploaded %s as %s", self.filename, _get(found, "id"))
        self._save(file_id=_get(found, "id"), filename=self.filename)
        return str(_get(found, "id"))

    async def job(self, file_id: str) -> tuple[Any, bool]:
        """The job for this key: recorded, found by suffix or training file, or created now; and whether it
        already existed."""
        litellm = llm_runtime.litellm()
        if self.record.get("job_id"):
            return await litellm.aretrieve_fine_tuning_job(fine_tuning_job_id=self.record["job_id"],
                                                           **self.kwargs), True
        listed = await litellm.alist_fine_tuning_jobs(limit=100, **self.kwargs)
        found = next((j for j in _items(listed) if _get(j, "status") not in _DEAD and (
            _get(j, "user_provided_suffix") == self.suffix or _get(j, "training_file") == file_id)), None)
        existed = found is not None
        if found is None:
            hyper = {k: v for k, v in (("n_epochs", self.remote.n_epochs), ("batch_size", self.remote.batch_size),
                                       ("learning_rate_multiplier", self.remote.learning_rate_multiplier))
                     if v is not None}
            found = await litellm.acreate_fine_tuning_job(model=self.plan.base.location, training_file=file_id,
                                                          hyperparameters=hyper, suffix=self.suffix,
                                                          seed=self.cfg.seed, **self.kwargs)
            log.info("created fine-tuning job %s", _get(found, "id"))
        self._save(job_id=_get(found, "id"), suffix=self.suffix, model=self.plan.base.location)
        return found, existed

    async def wait(self, job: Any, on_status: StatusListener) -> Any:
        """Poll until the job ends; a dead job fails the run (and is forgotten, so a rerun starts a new one)."""
        litellm = llm_runtime.litellm()
        deadline = time.monotonic() + self.remote.timeout_hours * 3600
        while True:
            status = str(_get(job, "status"))
            on_status(status, _PERCENT.get(status, 50))
            if status == "succeeded":
                return job
            if status in _DEAD:
                error = _get(job, "error")
                self._save(job_id=None, failed_job=_get(job, "id"))
                raise ModelError(f"fine-tuning job {_get(job, 'id')} {status}: "
                                 f"{_get(error, 'message') if error else 'no reason given'}; nothing was published")
            if time.monotonic() > deadline:
                raise ModelError(f"fine-tuning job {_get(job, 'id')} is still {status} after "
                                 f"{self.remote.timeout_hours:g} h; run the same command again to keep waiting")
            await asyncio.sleep(self.remote.poll_seconds)
            job = await litellm.aretrieve_fine_tuning_job(fine_tuning_job_id=_get(job, "id"), **self.kwargs)


async def _run(plan: FinetunePlan, cfg: FinetuneConfig, on_status: StatusListener) -> dict[str, Any]:
    remote = RemoteJob(plan, cfg)
    try:
        file_id = await remote.file_id()
        job, existed = await remote.job(file_id)
        job = await remote.wait(job, on_status)
    except ModelError:
        raise
    except Exception as exc:  # litellm maps provider errors to its own types; the message is what a user needs
        raise ModelError(f"remote trainer ({cfg.remote.provider} at {cfg.remote.api_base or 'default'}): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    remote._save(fine_tuned_model=_get(job, "fine_tuned_model"), status="succeeded")
    return {"file_id": file_id, "job_id": str(_get(job, "id")), "resumed": existed,
            "fine_tuned_model": str(_get(job, "fine_tuned_model")), "trained_tokens": _get(job, "trained_tokens")}


def train(plan: FinetunePlan, cfg: FinetuneConfig, on_status: StatusListener) -> dict[str, Any]:
    """Upload, create (or find) and wait for the job; returns its ids and the tuned model's name."""
    return llm_runtime.run_on_call_loop(_run(plan, cfg, on_status))
