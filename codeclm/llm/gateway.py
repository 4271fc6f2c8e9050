"""The LLM call engine: the only module that calls litellm's completion.

One retry layer (ours: litellm's and the OpenAI SDK's retries are off), an explicit timeout on every
attempt and a deadline on the whole call, a second copy (hedge) of a call that hangs, a circuit breaker per
endpoint that pauses calls while it is unreachable, a per-call disk cache keyed on content, structured output
fitted to the endpoint, tolerant parsing, and per-call tokens and cost. Calls run on the process's one call
loop (codeclm.llm.llm_runtime), so batch tasks in many threads share litellm's connection pools; every HTTP
request asks the endpoint's adaptive limiter (codeclm.llm.concurrency) for a slot and tells it how it went.
Where calls go and the checks before a run live in codeclm.llm.endpoints.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import email.utils
import enum
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

from codeclm.errors import ModelError, ParseError
from codeclm.llm import concurrency, llm_runtime
from codeclm.llm.breaker import BreakerPolicy, breaker_for
from codeclm.llm.cache import CallCache, call_key, kept_failure
from codeclm.llm.endpoints import Endpoint, resolve
from codeclm.ops import interrupt
from codeclm.ops.progress import report_calls
from codeclm.settings import CALLS, ROLES, Settings, StageSettings, scope

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)
V = TypeVar("V")
MemoKey = tuple[str, str, str, str]

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")
HEDGE_RECHECK_S = 0.5  # how often a request waiting for its hedge looks at the endpoint's latency again


class Reply(enum.StrEnum):
    """What kind of answer a call asks for, and so what is sent and what counts as usable."""

    TEXT = "text"  # plain text, returned as it is; usable even when cut at max_tokens; no `output`
    STRUCTURED = "structured"  # `output` by the endpoint's protocol (JSON schema...), `text_parser` as fallback
    STRUCTURED_CUT_OK = "structured_cut_ok"  # as STRUCTURED, and a cut answer is usable (what counts comes first)
    FREE_TEXT = "free_text"  # no schema sent: `text_parser` reads a free-text answer into `output`

    @property
    def cut_ok(self) -> bool:
        return self in (Reply.TEXT, Reply.STRUCTURED_CUT_OK)


@dataclass(kw_only=True)
class Call:
    """One request to make: messages for a role, the kind of reply and the model to parse it into, and where
    it belongs."""

    role: str
    messages: list[dict[str, str]]
    output: type[BaseModel] | None
    prompt_version: str
    stage: str
    item_id: str
    reply: Reply = Reply.STRUCTURED
    temperature: float | None = None
    max_tokens: int | None = None
    text_parser: Callable[[str], BaseModel] | None = None

    def __post_init__(self) -> None:
        if (self.reply is Reply.TEXT) != (self.output is None):
            raise ValueError(f"{self.stage}: a {self.reply.value} reply {'takes no' if self.output else 'needs an'} "
                             "output model")
        if self.reply is Reply.FREE_TEXT and self.text_parser is None:
            raise ValueError(f"{self.stage}: a free-text reply needs a text_parser")


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
    attempts: int = 0  # HTTP requests sent, hedges included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: bool = False
    cache_unreadable: bool = False  # a corrupt call-cache entry was found for this call and ignored
    truncated: bool = False
    error_type: str = ""
    message: str = ""


class _Transient(Exception):
    """An attempt failed in a way worth retrying after `delay` seconds (None: use backoff); `unreachable`: the
    request did not reach the server (refused, reset, timed out), which the endpoint's breaker counts."""

    def __init__(self, message: str, delay: float | None = None, status: int | None = None,
                 unreachable: bool = False) -> None:
        super().__init__(message)
        self.delay, self.status, self.unreachable = delay, status, unreachable


class _Fatal(Exception):
    """A call failed in a way retrying cannot fix (400, context length, retry-after above the cap)."""


class _DeadlinePassed(Exception):
    """The call's deadline (`call_deadline`) passed before a usable answer came."""


class EmptyResponse(Exception):
    """The client library returned no response at all (litellm does so after a second HTTP 422)."""


class _Clock:
    """A call's deadline: starts when its first request is admitted; waits for a slot or for the endpoint's
    breaker are added back, so only the call's own time (requests, backoffs, parse retries) counts."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends: float | None = None

    def start(self) -> None:
        if self.ends is None:
            self.ends = time.monotonic() + self.seconds

    def extend(self, seconds: float) -> None:
        if self.ends is not None:
            self.ends += seconds

    def remaining(self) -> float:
        return float("inf") if self.ends is None else self.ends - time.monotonic()

    def check(self) -> float:
        """Seconds left; raises once none are."""
        left = self.remaining()
        if left <= 0:
            raise _DeadlinePassed
        return left


@dataclass
class _Attempts:
    """Per call: its deadline and how many hedges it has sent (at most max_attempts - 1)."""

    clock: _Clock
    hedges: int = 0


class Gateway:
    """Makes calls for one endpoint identity (role configs and call settings); create with
    `gateway_for(settings)` to share it within a process."""

    def __init__(self, settings: Settings | StageSettings) -> None:
        self.settings = settings
        self.cache = CallCache(settings.cache_dir)
        self._loop = llm_runtime.call_loop()
        self._policy = BreakerPolicy(settings.breaker_failures, settings.breaker_probe_s, settings.breaker_stop_after)
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
        return "text" if call.reply in (Reply.TEXT, Reply.FREE_TEXT) else ep.output_mode

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
                if kept_failure(hit) and hit.get("error_type") == "Truncated" and not call.reply.cut_ok:
                    raise ParseError("cut at max_tokens")
                result.value = self._parse(call, ep, hit["text"])
            except ParseError:
                if kept_failure(hit) and not self.settings.retry_failed:
                    return self._kept(result, hit)
                hit = None  # the parser changed since this entry was stored, or --retry-failed: ask again
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

    @staticmethod
    def _kept(result: Result, hit: dict[str, Any]) -> Result:
        """A failure an earlier run kept (`kept_failure`), reported again without a request."""
        result.text, result.cached = hit["text"], True
        result.error_type = str(hit.get("error_type") or "ParseError")
        result.message = f"{hit.get('message', '')} [{KEPT_NOTE}]"
        report_calls(result.call.stage, cached=1, failed=1)
        return result

    async def _fresh(self, call: Call, ep: Endpoint, key: str, result: Result) -> Result:
        state = _Attempts(_Clock(self.settings.call_deadline))
        outputs: list[str] = []  # every answer that came back, to tell a fixed output from a sampled one
        try:
            for _ in range(self.settings.parse_attempts):
                if not await self._attempt_http(call, ep, result, state):
                    break
                outputs.append(result.text or "")
                try:
                    if result.truncated and not call.reply.cut_ok:
                        raise ParseError("output stopped at max_tokens; raise max_tokens for this role")
                    result.value = self._parse(call, ep, result.text or "")
                except ParseError as exc:
                    result.error_type = "Truncated" if result.truncated else "ParseError"
                    result.message = str(exc)
                    if self._fixed(call, ep, outputs):
                        break  # temperature 0 gave the same unusable answer twice: asking again cannot help
                    continue
                result.ok, result.error_type, result.message = True, "", ""
                self.cache.put(key, {"text": result.text, "model": ep.model,
                                     "usage": [result.prompt_tokens, result.completion_tokens]})
                break
        except _DeadlinePassed:
            last = f" (last: {result.error_type}: {result.message[:150]})" if result.error_type else ""
            result.error_type = "DeadlineExceeded"
            result.message = f"no usable answer within call_deadline ({self.settings.call_deadline:g}s){last}"
        if not result.ok and result.error_type in ("ParseError", "Truncated") and self._fixed(call, ep, outputs):
            self.cache.put(key, {"failed": True, "text": outputs[-1], "model": ep.model,
                                 "error_type": result.error_type, "message": result.message,
                                 "usage": [result.prompt_tokens, result.completion_tokens]})
            result.message = f"{result.message} [{KEPT_NOTE}]"
        report_calls(call.stage, done=1, failed=0 if result.ok else 1)
        if not result.ok:
            log.warning("%s %s failed after %d requests: %s: %s", call.stage, call.item_id, result.attempts,
                        result.error_type, result.message[:200])
        return result

    def _fixed(self, call: Call, ep: Endpoint, outputs: list[str]) -> bool:
        """Whether the unusable answers are what this request gives every time: temperature 0 and every answer
        the same (two at least, unless `parse_attempts` allows one). A new identical request cannot change such
        a failure, so it is kept (`kept_failure`); a sampled answer, or one that varied, may come out usable."""
        if self._temperature(call, ep) != 0 or not outputs or len(set(outputs)) != 1:
            return False
        return len(outputs) >= min(2, self.settings.parse_attempts)

    async def _attempt_http(self, call: Call, ep: Endpoint, result: Result, state: _Attempts) -> bool:
        """Up to max_attempts HTTP attempts, each holding a slot of the endpoint's limiter (backoff sleeps do
        not); True when a response came back (parsable or not). While the endpoint's breaker is open the
        attempt waits for it, and a request that found the endpoint down does not use up an attempt."""
        breaker = breaker_for(ep.identity)
        attempt = 0
        while attempt < self.settings.max_attempts:
            probe, waited = await breaker.admit(self._policy, self._where(ep))
            state.clock.extend(waited)
            state.clock.check()
            attempt += 1
            try:
                response = await self._send(call, ep, result, state)
            except _Fatal as exc:
                breaker.reached(probe)
                result.error_type, result.message = type(exc.__cause__ or exc).__name__, str(exc)
                return False
            except _Transient as exc:
                result.error_type, result.message = type(exc.__cause__ or exc).__name__, str(exc)
                if exc.unreachable:
                    breaker.unreachable(probe, self._policy)
                    if breaker.is_open:
                        attempt -= 1  # the endpoint is down, not this call: wait for it without using an attempt
                        continue
                else:
                    breaker.reached(probe)
                if attempt == self.settings.max_attempts:
                    return False
                delay = exc.delay if exc.delay is not None else self._backoff(attempt)
                if delay >= state.clock.remaining():
                    raise _DeadlinePassed from exc
                await asyncio.sleep(delay)
                continue
            except BaseException:
                breaker.release_probe(probe)
                raise
            breaker.reached(probe)
            self._account(result, response, ep)
            choice = response.choices[0]
            result.text = choice.message.content or ""
            result.truncated = choice.finish_reason == "length"
            return True
        return False

    async def _send(self, call: Call, ep: Endpoint, result: Result, state: _Attempts) -> Any:
        """One attempt: a request, and when it stays in flight far longer than the endpoint's recent
        latency, another copy of it, then another after twice as long... (max_attempts - 1 copies per call:
        a copy can hang too, and one unanswered copy must not hold the run for the whole timeout); the first
        to finish is the attempt's outcome (a failed one: retried after backoff, waiting for a hung copy
        would not be quicker) and the others are cancelled. Every copy holds a slot of the
        limiter, so hedges count against the adaptive limit."""
        limiter = self.limiter(ep)
        waited = time.monotonic()
        ticket = await limiter.acquire(urgent=result.attempts > 0)  # a retry or re-ask goes first
        state.clock.extend(time.monotonic() - waited)
        state.clock.start()
        result.attempts += 1
        first = asyncio.ensure_future(self._request(call, ep, limiter, ticket, state.clock.remaining()))
        first.add_done_callback(_retrieved)
        tasks = [first]
        try:
            sent = time.monotonic()
            while state.hedges < self.settings.max_attempts - 1:
                # the threshold is looked at again while waiting: the first calls to an endpoint go out before
                # any latency is known, and must not wait out the first guess once the answers tell better
                hedge_after = self._hedge_after(limiter, ep)
                if hedge_after is None:
                    break
                due = sent + hedge_after * (2 ** (len(tasks)) - 1)  # copies after h, 3h, 7h...
                now = time.monotonic()
                if due - now >= state.clock.remaining():
                    break
                done, _ = await asyncio.wait(tasks, timeout=max(0.0, min(due - now, HEDGE_RECHECK_S)))
                if done:
                    break
                if time.monotonic() < due:
                    continue
                state.hedges += 1
                result.attempts += 1
                limiter.count_hedge()
                log.info("%s %s: no answer after %.1fs; sending copy %d", call.stage, call.item_id,
                         time.monotonic() - sent, len(tasks) + 1)
                hedge = asyncio.ensure_future(self._hedge(call, ep, limiter, state.clock))
                hedge.add_done_callback(_retrieved)
                tasks.append(hedge)
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finished = [t for t in tasks if t.done() and not t.cancelled()]
            errors = [t.exception() for t in finished]  # retrieved, so a losing failure is not reported later
            winner = next((t for t, e in zip(finished, errors, strict=True) if e is None), finished[0])
            return winner.result()
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()  # its request is abandoned; its slot is released as it unwinds

    def _hedge_after(self, limiter: concurrency.EndpointLimiter, ep: Endpoint) -> float | None:
        """Seconds after which a request deserves a second copy: hedge_factor × the recent 95th percentile
        latency (its slowest one while there are few, a quarter of the timeout before there is any), never under
        hedge_min_s; None: no hedging."""
        if not self.settings.hedge or limiter.fixed:  # a one-slot server would only queue the copy
            return None
        p95 = limiter.latency_quantile(0.95)
        usual = ep.config.timeout / 4 if p95 is None else self.settings.hedge_factor * p95
        return max(self.settings.hedge_min_s, usual)

    async def _hedge(self, call: Call, ep: Endpoint, limiter: concurrency.EndpointLimiter, clock: _Clock) -> Any:
        timeout = clock.check()
        ticket = await limiter.acquire(urgent=True)
        return await self._request(call, ep, limiter, ticket, timeout)

    async def _request(self, call: Call, ep: Endpoint, limiter: concurrency.EndpointLimiter,
                       ticket: concurrency.Ticket, timeout: float) -> Any:
        """One HTTP request holding `ticket`; tells the limiter how it went."""
        try:
            response = await self._complete(call, ep, max(0.001, min(ep.config.timeout, timeout)))
        except _Fatal as exc:
            limiter.release(ticket, headers=_headers(exc.__cause__))
            raise
        except _Transient as exc:
            limiter.release(ticket, congested=exc.status in (429, 503), retry_after=exc.delay,
                            headers=_headers(exc.__cause__))
            raise
        except BaseException:
            limiter.release(ticket)
            raise
        usage = getattr(response, "usage", None)
        limiter.release(ticket, ok=True, headers=_headers(response), tokens=getattr(usage, "total_tokens", 0) or 0)
        return response

    def _backoff(self, attempt: int) -> float:
        base = min(self.settings.backoff_max, self.settings.backoff_base * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.5)

    @staticmethod
    def _where(ep: Endpoint) -> str:
        return f"{ep.role} model {ep.model} at {ep.api_base or 'its provider'}"

    async def _complete(self, call: Call, ep: Endpoint, timeout: float) -> Any:
        litellm = llm_runtime.litellm()
        kwargs: dict[str, Any] = {
            "model": ep.model,
            "messages": call.messages,
            "temperature": self._temperature(call, ep),
            "max_tokens": call.max_tokens or ep.config.max_tokens,
            "timeout": timeout,
            "num_retries": 0,
            "max_retries": 0,
        }
        if ep.api_base:
            kwargs["api_base"] = ep.api_base
        if ep.api_key:
            kwargs["api_key"] = ep.api_key
        elif ep.api_base and not os.environ.get("OPENAI_API_KEY"):
            kwargs["api_key"] = "sk-no-key"  # OpenAI-compatible servers often need none; the SDK insists on one
        if self._mode(call, ep) != "text" and call.output is not None:
            kwargs["response_format"] = _response_format(call.output, ep.output_mode)
        try:
            response = await litellm.acompletion(**kwargs)
        except Exception as exc:
            raise self._classify(exc, ep) from exc
        if response is None:  # litellm (drop_params) answers a 422 it could not fix by dropping params with None
            raise _Fatal("the endpoint rejected the request as unprocessable (HTTP 422)") from EmptyResponse()
        return response

    def _classify(self, exc: Exception, ep: Endpoint) -> Exception:
        litellm = llm_runtime.litellm()
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
        if (isinstance(exc, litellm.APIConnectionError | litellm.Timeout) and status in (None, 408, 500)) \
                or _did_not_reach(exc):
            return _Transient(message, unreachable=True)
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
                cost = llm_runtime.litellm().completion_cost(completion_response=response, model=ep.model)
            except Exception:  # unpriced (self-hosted) models raise; they are counted and flagged instead
                cost = None
        result.cost_usd += cost or 0.0
        result.unpriced = result.unpriced or cost is None

    @staticmethod
    def _parse(call: Call, ep: Endpoint, text: str) -> Any:
        if call.reply is Reply.TEXT:
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


KEPT_NOTE = ("kept: at temperature 0 every attempt got this same answer, so a rerun reports it without asking again; "
             "--retry-failed asks again")


def _did_not_reach(exc: BaseException) -> bool:
    """The request never got an answer from the server (refused, reset, timed out): litellm reports a refused
    connection to an OpenAI-compatible server as an InternalServerError, so look at what caused it."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, httpx.TransportError | ConnectionError | TimeoutError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a request's failure as seen: a losing or abandoned copy (the run stopped, the other copy won) fails
    quietly instead of asyncio's "Task exception was never retrieved" traceback."""
    if not task.cancelled():
        task.exception()


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
