"""The prompt format of a base model without a chat template (the paper tunes raw LLaMA): the Alpaca prompt in
prompts/alpaca_chat_template.jinja. It is set on the tokenizer as its chat template before training, so TRL
renders the training pairs with it, and saved with the tuned model and with a copy of the base that codeclm
serves as the untuned baseline: training, the tuned model's server and the base's server render one format.
A base with its own chat template keeps it. No heavy imports: the tokenizer is handed in."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from functools import cache
from pathlib import Path
from typing import Any

from codeclm.llm.prompts import PROMPTS_DIR

ALPACA = "alpaca"  # the format a base without a chat template trains and is served with
OWN = "the base's chat template"
TEMPLATE_FILE = "alpaca_chat_template.jinja"
_BOS = "{{- bos_token -}}\n"  # for tokenizers that start every text with BOS (LLaMA): the template writes it


@cache
def template_text() -> str:
    return (PROMPTS_DIR / TEMPLATE_FILE).read_text()


def template_digest() -> str:
    """The template's content hash: part of every local training's key, since it decides how a template-less
    base is trained."""
    return hashlib.sha256(template_text().encode()).hexdigest()[:16]


def chat_template(bos: bool) -> str:
    """The Jinja chat template, writing the BOS token first when the tokenizer adds one to plain text (chat
    templates are tokenized without special tokens, by TRL and by the servers alike)."""
    return _BOS + template_text() if bos else template_text()


def ensure_template(tokenizer: Any) -> str:
    """Give a tokenizer without a chat template the Alpaca one; the format its chat turns are rendered in."""
    if tokenizer.chat_template:
        return OWN
    bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    tokenizer.chat_template = chat_template(bos)
    return ALPACA


def templated_base(base_dir: str | Path, tokenizer: Any, home: Path, identity: str) -> Path:
    """A copy of the base checkpoint that serves in the Alpaca format: the tokenizer (with the template) saved
    anew, every other file a symlink to the base's (no weights are copied). Made once per base and template
    under HOME/finetune/base/; the base itself is never written to."""
    source = _local_dir(base_dir)
    target = home / "finetune" / "base" / f"{identity.replace(':', '-')[:24]}-{ALPACA}-{template_digest()[:8]}"
    if (target / "_done").exists():
        return target
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    tokenizer.save_pretrained(staging)
    for entry in source.iterdir():
        if not (staging / entry.name).exists() and not entry.name.startswith((".", "_")):
            (staging / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    (staging / "_done").write_text(f"{identity}\n{template_digest()}\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _local_dir(base_dir: str | Path) -> Path:
    """The base's files on disk: the directory itself, or a hub id's snapshot in the local cache."""
    path = Path(base_dir)
    if path.is_dir():
        return path
    from transformers.utils import cached_file

    config = cached_file(str(base_dir), "config.json")
    if config is None:
        raise FileNotFoundError(f"{base_dir}: no local copy of its config.json")
    return Path(config).parent
