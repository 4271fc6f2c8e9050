"""Where a role's calls go and whether they can go there: endpoint resolution and the checks made before a run
(the model is known, the key is set, the server answers, the instructions fit the model's context).

Kept apart from the call engine (codeclm.llm.gateway): the CLI and the flows check a run before any call is made,
and these checks need settings and litellm's facts about a model, not the engine's retries and cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from codeclm.errors import ConfigError, ModelError
from codeclm.llm import llm_runtime
from codeclm.llm.embedded import CONTEXT_TOKENS, EMBEDDED_MODEL, EMBEDDED_URL_ENV
from codeclm.llm.model_facts import model_facts
from codeclm.settings import RoleConfig, Settings, StageSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """A role resolved for calling: what litellm gets, and what identifies it in cache keys."""

    role: str
    model: str
    api_base: str | None
    api_key: str | None
    identity: str
    output_mode: str
    config: RoleConfig
    priced: bool = False  # litellm has a price for it; unpriced models skip the (costly, raising) cost lookup


def resolve(settings: Settings | StageSettings, role: str) -> Endpoint:
    """Turn a role's settings into an endpoint; 'embedded' becomes the local llama.cpp server."""
    cfg = settings.role(role)
    if cfg.embedded:
        url = os.environ.get(EMBEDDED_URL_ENV)
        if not url:
            raise ModelError(f"{role} model is 'embedded' but the local model server is not running; "
                             "run through `codeclm`, or set a model for this role")
        mode = "json_object" if cfg.output_mode == "auto" else cfg.output_mode
        return Endpoint(role, EMBEDDED_MODEL, url, "sk-local", f"embedded:{EMBEDDED_MODEL}", mode, cfg)
    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise ModelError(f"{role} model {cfg.model}: env var {cfg.api_key_env} is not set; export the key")
    facts = model_facts(cfg.model, cfg.api_base, settings.home)
    mode = cfg.output_mode
    if mode == "auto":
        mode = "json_schema" if facts.schema else "text"
    identity = cfg.identity or f"{cfg.model}@{cfg.api_base or 'default'}"
    return Endpoint(role, cfg.model, cfg.api_base, api_key, identity, mode, cfg, priced=facts.priced)


_PREFLIGHTED: set[str] = set()  # role configs already checked in this process (the CLI checks before the flow)


def preflight(settings: Settings, roles: Sequence[str]) -> None:
    """Fail before any work for an unknown model, a missing key or an unreachable endpoint."""
    for role in roles:
        checked = f"{role}:{settings.role(role).model_dump_json()}"
        if settings.role(role).embedded or checked in _PREFLIGHTED:
            continue
        ep = resolve(settings, role)
        provider = model_facts(ep.model, ep.api_base, settings.home).provider
        if provider is None:
            raise ModelError(f"{role} model {ep.model!r} is not a model string litellm knows; use "
                             "'provider/model', e.g. openai/gpt-4o-mini or gemini/gemini-2.0-flash")
        if ep.api_base:
            _check_reachable(role, ep.api_base)
        elif not ep.api_key:
            missing = llm_runtime.litellm().validate_environment(model=ep.model).get("missing_keys") or []
            if missing:
                raise ModelError(f"{role} model {ep.model}: {', '.join(missing)} is not set; export the key "
                                 f"or set {role}.api_key_env")
        log.debug("preflight ok for %s (%s via %s)", role, ep.model, provider)
        _PREFLIGHTED.add(checked)


def _check_reachable(role: str, api_base: str) -> None:
    try:
        httpx.get(api_base.rstrip("/") + "/models", timeout=5.0)
    except httpx.HTTPError as exc:
        raise ModelError(f"{role} endpoint {api_base} is unreachable ({type(exc).__name__}); "
                         "start the server or fix api_base") from None


def context_limit(settings: Settings | StageSettings, role: str) -> int | None:
    """Tokens a role's model accepts (prompt + answer), from settings, the embedded server or litellm."""
    cfg = settings.role(role)
    if cfg.context_tokens:
        return cfg.context_tokens
    if cfg.embedded:
        return CONTEXT_TOKENS
    return model_facts(cfg.model, cfg.api_base, settings.home).context


def check_context(texts: Sequence[tuple[str, str]], settings: Settings, role: str, overhead: int,
                  source: str) -> None:
    """Refuse texts that cannot fit the role's context with the prompt around them and room to answer."""
    limit = context_limit(settings, role)
    if limit is None:
        return
    cfg = settings.role(role)
    room = limit - overhead - cfg.max_tokens
    if room <= 0:  # no instruction can fit: say which settings clash instead of blaming the first seed
        raise ConfigError(f"the {role} model's context ({limit} tokens) cannot hold the prompt (about {overhead} "
                          f"tokens) plus {role}.max_tokens ({cfg.max_tokens}); raise {role}.context_tokens or "
                          f"lower {role}.max_tokens")
    model = EMBEDDED_MODEL if cfg.embedded else cfg.model
    for where, text in texts:
        if len(text) < room:  # a token is at least one character: short texts cannot overflow
            continue
        tokens = llm_runtime.litellm().token_counter(model=model, text=text)
        if tokens > room:
            raise ModelError(f"{source}: {where}: instruction is about {tokens} tokens; the {role} model's "
                             f"context ({limit}) leaves {room} after the prompt and answer; shorten it or raise "
                             f"{role}.context_tokens / lower {role}.max_tokens")
