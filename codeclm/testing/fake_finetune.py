"""The fake OpenAI server with the files and fine-tuning endpoints, for the remote trainer's tests.

A `FakeLLMServer` (chat completions, faults, request log) that also accepts multipart uploads on /v1/files and
runs fine-tuning jobs on /v1/fine_tuning/jobs: each status check moves a job one state on
(validating_files -> queued -> running -> succeeded), and a succeeded job names its `fine_tuned_model`, which the
same server then answers chat requests for. `ops` records every files/jobs request, so a test can count uploads
and job creations. Stdlib only, like its parent.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import time
from typing import Any

from codeclm.testing.fake_llm import FakeLLMServer, _error, _Handler

STATES = ("validating_files", "queued", "running", "succeeded")


class _FineTuneHandler(_Handler):
    server: Any

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        fake: FakeFineTuneServer = self.server.fake
        if path == "/v1/files":
            self.send_json(200, {"object": "list", "data": fake._list("files", "GET /files", None)})
        elif path == "/v1/fine_tuning/jobs":
            self.send_json(200, {"object": "list", "has_more": False,
                                 "data": fake._list("jobs", "GET /fine_tuning/jobs", None)[::-1]})
        elif path.startswith("/v1/fine_tuning/jobs/"):
            job = fake._advance(path.rsplit("/", 1)[1])
            self.send_json(*((200, job) if job else (404, _error(404, "no such fine-tuning job"))))
        elif path.startswith("/v1/files/"):
            found = fake._list("files", "GET /files/{id}", path.rsplit("/", 1)[1])
            self.send_json(*((200, found[0]) if found else (404, _error(404, "no such file"))))
        else:
            super().do_GET()

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        fake: FakeFineTuneServer = self.server.fake
        if path == "/v1/files":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = fake._upload(self.headers.get("Content-Type", ""), body)
            self.send_json(status, payload)
        elif path == "/v1/fine_tuning/jobs":
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            except ValueError as exc:
                return self.send_json(400, _error(400, f"request body is not JSON: {exc}"))
            self.send_json(*fake._create_job(body))
        else:
            super().do_POST()


class FakeFineTuneServer(FakeLLMServer):
    """Chat completions plus OpenAI-style files and fine-tuning jobs, all in memory."""

    handler_class = _FineTuneHandler

    def __init__(self, *args: Any, fail_jobs: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_jobs = fail_jobs
        self._ft_lock = threading.Lock()
        self.files: dict[str, dict[str, Any]] = {}
        self.file_bytes: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.ops: list[str] = []
        self._ft_ids = itertools.count(1)

    def count(self, op: str) -> int:
        with self._ft_lock:
            return sum(1 for o in self.ops if o == op)

    def _list(self, kind: str, op: str, one: str | None) -> list[dict[str, Any]]:
        with self._ft_lock:
            self.ops.append(op)
            table = self.files if kind == "files" else self.jobs
            return [dict(v) for k, v in table.items() if one is None or k == one]

    def _upload(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts() if message.is_multipart() else []:
            name = part.get_param("name", header="content-disposition")
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
        if "file" not in fields or "purpose" not in fields:
            return 400, _error(400, "multipart upload needs 'file' and 'purpose'")
        filename, content = fields["file"]
        for number, line in enumerate(content.decode().splitlines(), start=1):
            if line.strip() and "messages" not in json.loads(line):
                return 400, _error(400, f"line {number} has no 'messages'")
        with self._ft_lock:
            self.ops.append("POST /files")
            file_id = f"file-fake{next(self._ft_ids)}"
            self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content),
                                   "created_at": int(time.time()), "filename": filename or "upload.jsonl",
                                   "purpose": fields["purpose"][1].decode(), "status": "processed"}
            self.file_bytes[file_id] = content
            return 200, dict(self.files[file_id])

    def _create_job(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._ft_lock:
            self.ops.append("POST /fine_tuning/jobs")
            if body.get("training_file") not in self.files:
                return 400, _error(400, f"training_file {body.get('training_file')!r} was not uploaded")
            job_id = f"ftjob-fake{next(self._ft_ids)}"
            self.jobs[job_id] = {
                "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "finished_at": None,
                "model": body.get("model"), "fine_tuned_model": None, "organization_id": "org-fake",
                "result_files": [], "status": STATES[0], "validation_file": None,
                "training_file": body["training_file"], "hyperparameters": body.get("hyperparameters") or {},
                "trained_tokens": None, "error": None, "seed": body.get("seed") or 0,
                "user_provided_suffix": body.get("suffix")}
            return 200, dict(self.jobs[job_id])

    def _advance(self, job_id: str) -> dict[str, Any] | None:
        """A status check moves the job one state on; the last step succeeds (or fails, with `fail_jobs`)."""
        with self._ft_lock:
            self.ops.append("GET /fine_tuning/jobs/{id}")
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job["status"] in STATES[:-1]:
                job["status"] = STATES[STATES.index(job["status"]) + 1]
                if job["status"] == "succeeded" and self.fail_jobs:
                    job["status"] = "failed"
                    job["error"] = {"code": "invalid_training_file", "message": "injected failure", "param": None}
                elif job["status"] == "succeeded":
                    job["fine_tuned_model"] = f"ft:{job['model']}:org-fake:{job['user_provided_suffix']}:{job_id}"
                    job["finished_at"] = int(time.time())
                    job["trained_tokens"] = len(self.file_bytes[job["training_file"]].split())
            return dict(job)
