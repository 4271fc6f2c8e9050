"""Prompt templates in `prompts/`: one file per paper prompt, rendered with untrusted text kept inside tags.

A template file has `[system]`, `[user]`, `[format:text]` and `[format:json]` sections and `$name`
placeholders; its content hash goes into every call's cache key, so editing a prompt invalidates its calls.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template

PROMPTS_DIR = Path(os.environ.get("CODECLM_PROMPTS_DIR", Path(__file__).resolve().parents[2] / "prompts"))
_SECTION = re.compile(r"^\[(system|user|format:text|format:json)\]\s*$", re.MULTILINE)
_COMMENT = re.compile(r"<!--.*?-->\s*", re.DOTALL)
_TAG = re.compile(r"</?\s*(instruction|question|answer)\b[^>]*>", re.IGNORECASE)


@dataclass(frozen=True)
class Prompt:
    """A parsed template; `version` is the hash of the file's bytes."""

    name: str
    version: str
    sections: dict[str, str]

    def render(self, *, structured: bool, **values: object) -> list[dict[str, str]]:
        """Chat messages, with the JSON format section when `structured` (else the text one); values are stripped
        of our delimiter tags so data cannot close its own tag."""
        clean = {k: _TAG.sub("", v) if isinstance(v, str) else v for k, v in values.items()}
        user = Template(self.sections["user"]).substitute(clean)
        fmt = self.sections.get("format:json" if structured else "format:text")
        if fmt:
            user = f"{user}\n\n{Template(fmt).substitute(clean)}"
        messages = [{"role": "user", "content": user}]
        if "system" in self.sections:
            messages.insert(0, {"role": "system", "content": self.sections["system"]})
        return messages


@cache
def load_prompt(name: str) -> Prompt:
    path = PROMPTS_DIR / f"{name}.md"
    raw = path.read_text()
    body = _COMMENT.sub("", raw)
    parts = _SECTION.split(body)
    sections = {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    if "user" not in sections:
        raise ValueError(f"{path}: template has no [user] section")
    return Prompt(name=name, version=hashlib.sha256(raw.encode()).hexdigest()[:16], sections=sections)
