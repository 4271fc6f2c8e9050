"""Content-addressed store of successful LLM calls on disk, shared by processes and surviving crashes.

One JSON file per key, written to a temp name and renamed, so a killed writer never leaves a torn entry
that a reader trusts; an unreadable entry is a miss. Failures are never stored here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def call_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of everything that determines a response (never the API key)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class CallCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("call cache entry %s is unreadable; treating it as a miss", path)
            return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(entry, ensure_ascii=False))
        os.replace(tmp, path)
