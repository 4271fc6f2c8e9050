"""The LLM gateway: the only module that calls litellm.

One retry layer (ours: litellm's and the OpenAI SDK's retries are off), an explicit timeout on every
attempt, a per-call disk cache keyed on content, structured output fitted to the endpoint, tolerant
parsing, and per-call tokens and cost. Calls run on one background event loop per process, so batch
tasks in many threads share litellm's connection pools; every HTTP attempt asks the endpoint's adaptive
limiter (codeclm.concurrency, one per endpoint per process) for a slot and tells it how the attempt went.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import email.utils
import functools
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from codeclm import concurrency, interrupt
from codeclm.cache import CallCache, call_key
from codeclm.embedded import CONTEXT_TOKENS, EMBEDDED_MODEL, EMBEDDED_URL_ENV
from codeclm.errors import ConfigError, ModelError, ParseError
from codeclm.model_facts import litellm_module, model_facts
from codeclm.progress import report_calls
from codeclm.settings import CALLS, ROLES, RoleConfig, Settings, StageSettings, scope

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)
V = TypeVar("V")
MemoKey = tuple[str, str, str, str]

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


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


@dataclass
class Call:
    """One request to make: messages for a role, the output model to parse into, and where it belongs."""

    role: str
    messages: list[dict[str, str]]
    output: type[BaseModel] | None
    prompt_version: str
    stage: str
    item_id: str
    temperature: float | None = None
    max_tokens: int | None = None
    text_parser: Callable[[str], BaseModel] | None = None
    free_text: bool = False  # one free-text answer: no schema sent, `text_parser` reads it (cheap on llama.cpp)
    truncation_ok: bool | None = None  # usable when cut at max_tokens; default: only plain answers (no output)

    @property
    def accepts_truncation(self) -> bool:
        return self.output is None if self.truncation_ok is None else self.truncation_ok


@dataclass
class Result:
    """What came of a call: a parsed value (or plain text), or a failure with its last raw output."""

    call: Call
    key: str
    model: str
    value: Any = None
    text: str | None = None
    ok: bool = False
    cached: bool = False
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: bool = False
    cache_unreadable: bool = False  # a corrupt call-cache entry was found for this call and ignored
    truncated: bool = False
    error_type: str = ""
    message: str = ""


class _Transient(Exception):
    """An attempt failed in a way worth retrying after `delay` seconds (None: use backoff)."""

    def __init__(self, message: str, delay: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.delay, self.status = delay, status


class _Fatal(Exception):
    """A call failed in a way retrying cannot fix (400, context length, retry-after above the cap)."""


class EmptyResponse(Exception):
    """The client library returned no response at all (litellm does so after a second HTTP 422)."""


@dataclass
class _RoleState:
    """Per endpoint: the circuit breaker's count of connection failures in a row."""

    consecutive_failures: int = 0


_litellm = litellm_module


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
            missing = _litellm().validate_environment(model=ep.model).get("missing_keys") or []
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


class Gateway:
    """Makes calls for one endpoint identity (role configs and call settings); create with
    `gateway_for(settings)` to share it within a process."""

    def __init__(self, settings: Settings | StageSettings) -> None:
        self.settings = settings
        self.cache = CallCache(settings.cache_dir)
        self._loop = _shared_loop()
        self._roles: dict[str, _RoleState] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._inflight: dict[str, asyncio.Future[Result]] = {}
        self._started: dict[MemoKey, asyncio.Future[Result]] = {}  # calls begun by `submit`, kept for `run`

    def endpoint(self, role: str) -> Endpoint:
        if role not in self._endpoints:
            self._endpoints[role] = resolve(self.settings, role)
        return self._endpoints[role]

    def run(self, calls: Sequence[Call]) -> list[Result]:
        """Make all calls concurrently (bounded per role) and return results in order; never raises for a
        single failed call, only for errors that doom the whole run (ModelError)."""
        interrupt.raise_if_stopped()
        future = asyncio.run_coroutine_threadsafe(self._run_all(list(calls)), self._loop)
        try:
            return future.result()
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            interrupt.raise_if_stopped()  # stopped on purpose: say why (dead model server, Ctrl-C)
            raise

    async def _run_all(self, calls: list[Call]) -> list[Result]:
        results = await asyncio.gather(*(self._started_or_new(c) for c in calls), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def _memo_key(self, call: Call) -> MemoKey:
        return self.key(call), call.role, call.stage, call.item_id

    async def _started_or_new(self, call: Call) -> Result:
        """The result of this call begun earlier by `submit` (exactly as it came: attempts, tokens, cached), or
        a new call."""
        started = self._started.pop(self._memo_key(call), None)
        if started is None:
            return await self._one(call)
        return dataclasses.replace(await asyncio.shield(started), call=call)

    def submit(self, call: Call) -> asyncio.Future[Result]:
        """Begin a call now, on this gateway's loop (call from a coroutine running there); a later `run` asking
        for the same call gets this result instead of calling again. Lets a step start an item's next call as
        soon as its previous one is answered and still record every call through its usual `run`."""
        started = asyncio.ensure_future(self._one(call))
        self._started[self._memo_key(call)] = started
        return started

    def drive(self, coro: Coroutine[Any, Any, V]) -> V:
        """Run a coroutine on this gateway's loop (where `submit` works) from a worker thread, and wait."""
        if interrupt.stopped():
            coro.close()
            interrupt.raise_if_stopped()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            interrupt.raise_if_stopped()  # stopped on purpose: say why (dead model server, Ctrl-C)
            raise

    def forget(self, calls: Sequence[Call]) -> None:
        """Drop results begun by `submit` that no `run` asked for (thread-safe)."""
        keys = [self._memo_key(c) for c in calls]
        self._loop.call_soon_threadsafe(lambda: [self._started.pop(k, None) for k in keys])

    def _state(self, ep: Endpoint) -> _RoleState:
        return self._roles.setdefault(ep.identity, _RoleState())

    @staticmethod
    def limiter(ep: Endpoint) -> concurrency.EndpointLimiter:
        """The process-wide limiter of the endpoint (not of this gateway or role): roles, tasks and flows
        calling one endpoint share its slots. The embedded llama.cpp server answers one request at a time,
        so it gets one fixed slot; more in flight would only queue into timeouts."""
        cfg = ep.config
        return concurrency.limiter_for(ep.identity, 1 if cfg.embedded else cfg.max_concurrency, fixed=cfg.embedded,
                                       requests_per_minute=cfg.requests_per_minute,
                                       tokens_per_minute=cfg.tokens_per_minute)

    def key(self, call: Call) -> str:
        ep = self.endpoint(call.role)
        return call_key(
            model=ep.identity,
            messages=call.messages,
            temperature=self._temperature(call, ep),
            max_tokens=call.max_tokens or ep.config.max_tokens,
            output_mode=self._mode(call, ep),
            schema=schema_of(call.output) if self._mode(call, ep) != "text" and call.output else None,
            prompt_version=call.prompt_version,
        )

    @staticmethod
    def _mode(call: Call, ep: Endpoint) -> str:
        return "text" if call.output is None or call.free_text else ep.output_mode

    @staticmethod
    def _temperature(call: Call, ep: Endpoint) -> float:
        return ep.config.temperature if call.temperature is None else call.temperature

    async def _one(self, call: Call) -> Result:
        ep = self.endpoint(call.role)
        key = self.key(call)
        result = Result(call=call, key=key, model=ep.model)
        found = self.cache.get(key)
        hit, result.cache_unreadable = found.entry, found.unreadable
        if hit is not None:
            try:
                result.value = self._parse(call, ep, hit["text"])
            except ParseError:
                hit = None  # the parser changed since this entry was stored: ask again
        if hit is not None:
            result.text, result.ok, result.cached = hit["text"], True, True
            report_calls(call.stage, cached=1)
            return result
        shared = self._inflight.get(key)
        if shared is not None:  # the same request is already on its way (e.g. strong and target are one model)
            first = await asyncio.shield(shared)
            report_calls(call.stage, cached=1)
            return dataclasses.replace(first, call=call, cached=first.ok, attempts=0, prompt_tokens=0,
                                       completion_tokens=0, cost_usd=0.0)
        self._inflight[key] = asyncio.get_running_loop().create_future()
        try:
            result = await self._fresh(call, ep, key, result)
            self._inflight[key].set_result(result)
            return result
        except asyncio.CancelledError:
            self._inflight[key].cancel()
            raise
        except BaseException as exc:
            self._inflight[key].set_exception(exc)
            self._inflight[key].exception()  # retrieved: waiters, if any, get it; none is not an error
            raise
        finally:
            self._inflight.pop(key, None)

    async def _fresh(self, call: Call, ep: Endpoint, key: str, result: Result) -> Result:
        state = self._state(ep)
        for _ in range(self.settings.parse_attempts):
            if not await self._attempt_http(call, ep, result, state):
                break
            try:
                if result.truncated and not call.accepts_truncation:
                    raise ParseError("output stopped at max_tokens; raise max_tokens for this role")
                result.value = self._parse(call, ep, result.text or "")
            except ParseError as exc:
                result.error_type = "Truncated" if result.truncated else "ParseError"
                result.message = str(exc)
                continue
            result.ok, result.error_type, result.message = True, "", ""
            self.cache.put(key, {"text": result.text, "model": ep.model,
                                 "usage": [result.prompt_tokens, result.completion_tokens]})
            break
        report_calls(call.stage, done=1, failed=0 if result.ok else 1)
        if not result.ok:
            log.warning("%s %s failed after %d attempts: %s: %s", call.stage, call.item_id, result.attempts,
                        result.error_type, result.message[:200])
        return result

    async def _attempt_http(self, call: Call, ep: Endpoint, result: Result, state: _RoleState) -> bool:
        """Up to max_attempts HTTP attempts, each holding a slot of the endpoint's limiter (backoff sleeps do
        not); True when a response came back (parsable or not)."""
        limiter = self.limiter(ep)
        for attempt in range(1, self.settings.max_attempts + 1):
            ticket = await limiter.acquire()
            result.attempts += 1
            try:
                response = await self._complete(call, ep)
            except _Fatal as exc:
                limiter.release(ticket, headers=_headers(exc.__cause__))
                result.error_type, result.message = type(exc.__cause__ or exc).__name__, str(exc)
                return False
            except _Transient as exc:
                limiter.release(ticket, congested=exc.status in (429, 503), retry_after=exc.delay,
                                headers=_headers(exc.__cause__))
                result.error_type, result.message = type(exc.__cause__ or exc).__name__, str(exc)
                if attempt == self.settings.max_attempts:
                    return False
                await asyncio.sleep(exc.delay if exc.delay is not None else self._backoff(attempt))
                continue
            except BaseException:
                limiter.release(ticket)
                raise
            usage = getattr(response, "usage", None)
            limiter.release(ticket, ok=True, headers=_headers(response),
                            tokens=getattr(usage, "total_tokens", 0) or 0)
            state.consecutive_failures = 0
            self._account(result, response, ep)
            choice = response.choices[0]
            result.text = choice.message.content or ""
            result.truncated = choice.finish_reason == "length"
            return True
        return False

    def _backoff(self, attempt: int) -> float:
        base = min(self.settings.backoff_max, self.settings.backoff_base * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.5)

    async def _complete(self, call: Call, ep: Endpoint) -> Any:
        litellm = _litellm()
        kwargs: dict[str, Any] = {
            "model": ep.model,
            "messages": call.messages,
            "temperature": self._temperature(call, ep),
            "max_tokens": call.max_tokens or ep.config.max_tokens,
            "timeout": ep.config.timeout,
            "num_retries": 0,
            "max_retries": 0,
        }
        if ep.api_base:
            kwargs["api_base"] = ep.api_base
        if ep.api_key:
            kwargs["api_key"] = ep.api_key
        elif ep.api_base and not os.environ.get("OPENAI_API_KEY"):
            kwargs["api_key"] = "sk-no-key"  # OpenAI-compatible servers often need none; the SDK insists on one
        if call.output is not None and self._mode(call, ep) != "text":
            kwargs["response_format"] = _response_format(call.output, ep.output_mode)
        try:
            response = await litellm.acompletion(**kwargs)
        except Exception as exc:
            raise self._classify(exc, ep) from exc
        if response is None:  # litellm (drop_params) answers a 422 it could not fix by dropping params with None
            raise _Fatal("the endpoint rejected the request as unprocessable (HTTP 422)") from EmptyResponse()
        return response

    def _classify(self, exc: Exception, ep: Endpoint) -> Exception:
        litellm = _litellm()
        state = self._state(ep)
        status = getattr(exc, "status_code", None)
        message = str(exc)[:300]
        if isinstance(exc, litellm.ContextWindowExceededError):
            return _Fatal(f"prompt exceeds the context of {ep.model}: {message}")
        # litellm maps a 403 from OpenAI-compatible servers to a plain APIError, hence the status check
        auth = isinstance(exc, litellm.AuthenticationError | litellm.PermissionDeniedError) or status in (401, 403)
        if auth or "Missing credentials" in message:
            return ModelError(f"{ep.role} model {ep.model}: authentication failed ({status}); check the API key"
                              + (f" in {ep.config.api_key_env}" if ep.config.api_key_env else ""))
        if isinstance(exc, litellm.NotFoundError):
            return ModelError(f"{ep.role} model {ep.model}: not found at the provider ({status}); "
                              "check the model name and api_base")
        if isinstance(exc, litellm.APIConnectionError | litellm.Timeout) and status in (None, 408, 500):
            state.consecutive_failures += 1
            if state.consecutive_failures >= self.settings.breaker_failures:
                where = ep.api_base or "its provider"
                return ModelError(f"{ep.role} model {ep.model}: {state.consecutive_failures} calls in a row "
                                  f"could not reach {where}; stopping (completed calls are kept)")
            return _Transient(message)
        if status in (408, 409, 425, 429) or (isinstance(status, int) and status >= 500):
            delay = retry_after(exc)
            if delay is not None and delay > self.settings.retry_after_cap:
                return _Fatal(f"server asked to wait {delay:.0f}s, above retry_after_cap; {message}")
            return _Transient(message, delay, status)
        return _Fatal(message)

    def _account(self, result: Result, response: Any, ep: Endpoint) -> None:
        usage = getattr(response, "usage", None)
        result.prompt_tokens += getattr(usage, "prompt_tokens", 0) or 0
        result.completion_tokens += getattr(usage, "completion_tokens", 0) or 0
        cost = None
        if ep.priced:
            try:
                cost = _litellm().completion_cost(completion_response=response, model=ep.model)
            except Exception:  # unpriced (self-hosted) models raise; they are counted and flagged instead
                cost = None
        result.cost_usd += cost or 0.0
        result.unpriced = result.unpriced or cost is None

    @staticmethod
    def _parse(call: Call, ep: Endpoint, text: str) -> Any:
        if call.output is None:
            if not text.strip():
                raise ParseError("empty answer")
            return text
        errors: list[str] = []
        if Gateway._mode(call, ep) != "text":
            try:
                return call.output.model_validate_json(_FENCE.sub("", text.strip()))
            except ValidationError as exc:
                errors.append(f"JSON: {exc.errors()[0]['msg']}")
        if call.text_parser is not None:
            try:
                return call.text_parser(text)
            except (ParseError, ValidationError) as exc:
                errors.append(f"text: {exc}")
        raise ParseError("; ".join(errors) or "no parser accepted the output")


def _response_format(output: type[BaseModel], mode: str) -> dict[str, Any] | None:
    schema = schema_of(output)
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": output.__name__, "schema": schema}}
    if mode == "json_object":
        return {"type": "json_object", "schema": schema}
    return None


@functools.cache
def schema_of(output: type[BaseModel]) -> dict[str, Any]:
    """JSON schema of an output model, built once (pydantic rebuilds it on every call otherwise)."""
    return output.model_json_schema()


def _headers(source: Any) -> dict[str, str]:
    """Response headers of a litellm response or exception (lower-cased), for rate-limit information."""
    if source is None:
        return {}
    headers: dict[str, str] = {}
    hidden = getattr(source, "_hidden_params", None)
    found = [hidden.get("additional_headers") if isinstance(hidden, dict) else None,
             getattr(source, "litellm_response_headers", None), getattr(source, "headers", None),
             getattr(getattr(source, "response", None), "headers", None)]
    for item in found:
        if item:
            try:
                headers.update({str(k).lower(): str(v) for k, v in dict(item).items()})
            except (TypeError, ValueError):
                continue
    return headers


def retry_after(exc: Exception) -> float | None:
    """Seconds a server asked us to wait (Retry-After seconds or HTTP date, or retry-after-ms)."""
    headers = _headers(exc)
    if "retry-after-ms" in headers:
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_GATEWAYS: dict[str, Gateway] = {}
_LOCK = threading.Lock()
_LOOP_LOCK = threading.Lock()  # separate from _LOCK: Gateway() runs under _LOCK and asks for the loop
_LOOP: asyncio.AbstractEventLoop | None = None
def _shared_loop() -> asyncio.AbstractEventLoop:
    """The one background event loop of this process: litellm binds its logging worker to the loop it first
    sees, so a loop per Gateway left one pending worker task behind per Gateway ("Task was destroyed")."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="codeclm-llm", daemon=True).start()
            interrupt.register_loop(_LOOP)
        return _LOOP


def gateway_for(settings: Settings | StageSettings) -> Gateway:
    """One gateway per endpoint identity per process: the roles the settings (or a step's settings) hold and
    the call settings (`CALLS`), nothing else. Steps calling the same endpoints with different thresholds, and
    targets on one server, share it; the gateway itself sees only these settings."""
    own = scope(settings, "gateway", [*(r for r in ROLES if hasattr(settings, r)), *CALLS])
    fingerprint = json.dumps(own.model_dump(mode="json"), sort_keys=True)
    with _LOCK:
        if fingerprint not in _GATEWAYS:
            _GATEWAYS[fingerprint] = Gateway(own)
        return _GATEWAYS[fingerprint]


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
        tokens = _litellm().token_counter(model=model, text=text)
        if tokens > room:
            raise ModelError(f"{source}: {where}: instruction is about {tokens} tokens; the {role} model's "
                             f"context ({limit}) leaves {room} after the prompt and answer; shorten it or raise "
                             f"{role}.context_tokens / lower {role}.max_tokens")
