"""Content-addressed store of successful LLM calls on disk, shared by processes and surviving crashes.

One JSON file per key, written to a temp name and renamed, so a killed writer never leaves a torn entry
that a reader trusts. An entry that is unreadable anyway (a bad disk, a hand edit, another tool) is a miss:
logged, counted (`CallStats.cache_unreadable`), asked again, and overwritten by the fresh answer.

Failures are not stored, with one exception the gateway decides (`codeclm.llm.gateway.kept_failure`): an entry
with `"failed": true` holds an answer that temperature 0 gave every time and that does not parse; a new identical
request cannot change it, so a rerun reports it from here instead of paying for it again. Timeouts, 429s, 5xx,
connection errors and failures of sampled answers are never stored: a rerun asks again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def call_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of everything that determines a response (never the API key)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def kept_failure(entry: dict[str, Any]) -> bool:
    """An entry recording a failure a new identical request cannot change: at temperature 0 the same unusable
    answer (unparseable, or cut at max_tokens) came back every time (the gateway decides and stores it). Reruns
    report it from here; a parser that now reads its text, or `retry_failed`, makes it a miss."""
    return entry.get("failed") is True


@dataclass(frozen=True)
class Lookup:
    """A cache lookup: the stored entry, or None on a miss; `unreadable` says the miss was a corrupt entry."""

    entry: dict[str, Any] | None
    unreadable: bool = False


class CallCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Lookup:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return Lookup(None)
        except (OSError, ValueError) as exc:
            return self._unreadable(path, f"{type(exc).__name__}: {exc}")
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            return self._unreadable(path, "not an entry with a text")
        return Lookup(entry)

    @staticmethod
    def _unreadable(path: Path, why: str) -> Lookup:
        log.warning("call cache entry %s is unreadable (%s); treating it as a miss and calling again", path,
                    why[:200])
        return Lookup(None, unreadable=True)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(entry, ensure_ascii=False))
        os.replace(tmp, path)
