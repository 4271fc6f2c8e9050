"""What litellm says about a model string, remembered on disk per litellm version.

Importing litellm costs 4-10 s. A rerun of a finished run makes no LLM call, so it should not pay that only to be
told again that a model it used before is a known provider's, takes JSON schemas, has a price and holds so many
tokens. Those answers depend only on the model string, the api_base and litellm's version (its model map is
local: LITELLM_LOCAL_MODEL_COST_MAP), so they are kept in `home/models.json` and litellm is imported at the
first call that needs it. Unknown models are never remembered: they fail preflight every time.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from codeclm.llm import llm_runtime

log = logging.getLogger(__name__)
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelFacts:
    provider: str | None  # None: litellm does not know the model string
    context: int | None  # prompt + answer tokens, when litellm's map has them
    schema: bool  # litellm says the model takes a JSON schema (response_format json_schema)
    priced: bool  # litellm's map has a price (unpriced models skip the costly, raising cost lookup)


def _ask_litellm(model: str, api_base: str | None) -> ModelFacts:
    litellm = llm_runtime.litellm()
    try:
        provider: str | None = litellm.get_llm_provider(model, api_base=api_base)[1]
    except Exception:  # litellm raises its own types for unknown providers
        provider = None
    try:
        info = litellm.get_model_info(model)
        context = info.get("max_input_tokens") or info.get("max_tokens")
    except Exception:  # unknown to litellm's map: nothing to check against
        context = None
    try:
        schema = bool(litellm.supports_response_schema(model=model))
    except Exception:  # litellm raises for models missing from its map; plain text is the safe protocol
        schema = False
    priced = model in litellm.model_cost or model.split("/", 1)[-1] in litellm.model_cost
    return ModelFacts(provider, int(context) if context else None, schema, priced)


def model_facts(model: str, api_base: str | None, home: Path) -> ModelFacts:
    """litellm's facts about a model, from `home/models.json` when known for this litellm version."""
    path = home / "models.json"
    key = f"{importlib.metadata.version('litellm')}|{model}|{api_base or ''}"
    with _LOCK:
        known = _read(path)
        if key in known:
            try:
                return ModelFacts(**known[key])
            except TypeError:
                pass  # written by another version of this module: ask again
    facts = _ask_litellm(model, api_base)
    if facts.provider is not None:
        with _LOCK:
            known = _read(path)
            known[key] = asdict(facts)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            os.replace(tmp, path)
    return facts


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("%s is unreadable; asking litellm again", path)
        return {}
    return data if isinstance(data, dict) else {}
