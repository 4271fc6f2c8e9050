"""Adaptive concurrency per endpoint: one AIMD limiter per endpoint identity, shared by the whole process.

Why adaptive: a fixed per-role limit is either too low for a hosted API (the run idles at 8 requests in flight)
or too high for a small server (429 storms). So every HTTP attempt to an endpoint, from any task, flow, target,
Settings object or Gateway in this process, asks that endpoint's limiter for a slot, and reports back how it went:

* the limit starts at `START` (capped by the role's `max_concurrency`, the ceiling) and doubles per round trip
  while every call succeeds (slow start), then grows by one per window of successes (additive increase),
  eight times slower around the limit where the server pushed back last (so probing it costs few 429s);
* a 429 or 503 multiplies it by `DECREASE` (once per window: the answers to requests sent before the cut
  carry no new information), and a Retry-After holds every new request to that endpoint until it has passed;
  but only when the 429/503s follow our load. A server that refuses because it is full answers them only
  above its capacity: they rise with the number in flight and stop below it. A provider that answers a steady
  share with 429 whatever the load (other clients on the key, a flaky proxy) answers the same share at every
  level, and cutting would drive the limit to one slot without making them rarer. So each answer is kept
  with the number in flight when it was sent, and a 429 cuts unless the recent answers show the same share
  (at least `FLAT` times it, both at most `NOISE_MAX`) below the level a cut would reach as above it, or
  below their median level as above it (a run that does not fill its limit sends at many levels); if the
  share at the current limit is no lower than at the higher limits it was cut from, those cuts did not help
  and the limit grows back by slow start. While too few answers tell (`EVIDENCE` on each side), a 429 cuts
  only once 429/503s are over `NOISE_MAX` of the window's answers (at least `MIN_WINDOW`) or it carries a
  Retry-After: a server far over its capacity gets there within a round trip, random 429s at a steady share
  do not;
* a requests- or tokens-per-minute limit, configured or stated by the provider in `x-ratelimit-*` headers,
  paces admissions as a token bucket refilled continuously (as OpenAI describes its limits), and the stated
  `remaining` count corrects ours;
* a call in flight far longer than usual (a hung request) stops counting after a while, so it delays only
  its own instruction, not every call queued behind it; the recent latencies kept here also tell the gateway
  when such a call deserves a second copy (a hedge, which takes a slot like any request).

The embedded llama.cpp server answers one request at a time, so its limiter is fixed at one slot.
Limiters are loop-agnostic (a lock and per-waiter futures), so they work from any event loop or thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

START = 16  # first limit: safe for a hosted API's lowest tiers; slow start reaches the ceiling in a few round trips
DECREASE = 0.7  # multiplicative decrease on a 429/503
HISTORY = 400  # recent answers (200s and 429/503s) kept with the number in flight when each was sent ...
EVIDENCE = 20  # ... and a share is compared only over at least this many of them on each side of a level
FLAT = 0.5  # the share below a level is at least this fraction of the share above it: fewer in flight would not help
NOISE_MAX = 0.25  # a share above this is overload whatever its shape (the limit is still above the capacity)
MIN_WINDOW = 20  # too few answers to tell: a 429 cuts once they are over NOISE_MAX of this many in the window
PROBE_WINDOWS = 8  # near the last limit that drew a 429, grow one slot per this many windows of successes
STRAGGLER_FACTOR = 8.0  # a call in flight this many times the usual latency stops holding a slot ...
STRAGGLER_MIN_S = 10.0  # ... but never before this many seconds
LATENCY_SAMPLES = 256  # recent successful latencies kept for quantiles
MIN_SAMPLES = 20  # fewer than this: the slowest stands for the quantile
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(value: str) -> float | None:
    """Seconds in a rate-limit reset header: '1s', '6m0s', '250ms', '1h2m3.5s' or a plain number."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value.replace(" ", ""):
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


@dataclass
class Ticket:
    """One admitted request: when, in which window, and whether it still holds a slot."""

    epoch: int
    started: float
    holding: bool = True
    timer: asyncio.TimerHandle | None = None
    saturated: bool = True  # sent with every slot taken: its success says the limit could be higher
    level: int = 0  # requests in flight when it was sent, itself included


@dataclass
class _Bucket:
    """A per-minute budget refilled continuously; `level` may go negative (tokens are known only afterwards)."""

    per_minute: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.updated) * self.per_minute / 60.0)
        self.updated = now

    def wait(self, need: float) -> float:
        """Seconds until `need` is available (0: now)."""
        return 0.0 if self.level >= need else (need - self.level) * 60.0 / self.per_minute


@dataclass
class LimiterStats:
    """What a run reports about an endpoint: the limit it ended at and what moved it."""

    endpoint: str
    ceiling: int
    limit: int
    in_flight: int
    min_limit: int
    max_limit: int
    peak_in_flight: int
    calls: int
    congestion: int  # 429/503 answers
    decreases: int
    paused_s: float  # time new requests were held for a Retry-After
    stragglers: int  # calls that stopped holding a slot because they ran far longer than usual
    hedges: int  # second copies sent for calls in flight far longer than usual
    requests_per_minute: float | None
    tokens_per_minute: float | None


@dataclass
class EndpointLimiter:
    """AIMD concurrency plus per-minute pacing for one endpoint; see the module docstring."""

    endpoint: str
    ceiling: int
    fixed: bool = False
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    limit: float = 0.0
    in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=deque, repr=False)
    _urgent: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=deque, repr=False)
    _epoch: int = 0
    _slow_start: bool = True
    _plateau: float | None = None
    _paused_until: float = 0.0
    _latency: float | None = None  # running mean of successful call latency, seconds
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES), repr=False)
    _requests: _Bucket | None = None
    _tokens: _Bucket | None = None
    _stragglers_now: int = 0
    _window: tuple[int, int] = (0, 0)  # answers and 429/503s since the last cut
    _answers: deque[tuple[int, bool]] = field(default_factory=lambda: deque(maxlen=HISTORY), repr=False)
    _unmetered: int = 0
    _configured: tuple[float | None, float | None] = (None, None)
    _stated: tuple[float | None, float | None] = (None, None)
    _stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ceiling = max(1, self.ceiling)
        self.limit = float(self.ceiling if self.fixed else min(self.ceiling, START))
        self._stats = {"min_limit": self.limit, "max_limit": self.limit, "peak": 0, "calls": 0, "congestion": 0,
                       "decreases": 0, "paused_s": 0.0, "stragglers": 0, "hedges": 0}
        self._set_rates(self.requests_per_minute, self.tokens_per_minute, configured=True)

    # --- admission ---------------------------------------------------------------------------------------

    async def acquire(self, urgent: bool = False) -> Ticket:
        """Wait for a slot, the per-minute budgets and any Retry-After pause; returns the ticket to release.
        `urgent`: a request of a call already under way (a retry, a parse re-ask, a hedge) goes before every
        first request waiting: its call has waited once already, and the chain behind it (the next stage,
        the instruction's next round) waits on it, while fresh calls have the whole run to go."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                delay = self._admit_delay(time.monotonic(), urgent)
                if delay == 0.0:
                    return self._admit(loop)
                future: asyncio.Future[None] | None = None
                queue = self._urgent if urgent else self._waiters
                if delay is None:  # all slots taken: wait for a release
                    future = loop.create_future()
                    queue.append((loop, future))
            if future is None:  # paused or out of budget: check again when it should have passed
                await asyncio.sleep(delay)
                continue
            try:
                await future
            except asyncio.CancelledError:
                with self._lock:
                    if urgent:
                        self._urgent = deque(w for w in self._urgent if w[1] is not future)
                    else:
                        self._waiters = deque(w for w in self._waiters if w[1] is not future)
                self._wake_next()  # a slot this waiter was woken for must not be lost
                raise

    def _admit_delay(self, now: float, urgent: bool = False) -> float | None:
        """0: admit now; a number: check again after that many seconds; None: wait for a release (a first
        request also waits while urgent ones do)."""
        if now < self._paused_until:
            return self._paused_until - now
        wait = 0.0
        if self._requests is not None:
            self._requests.refill(now)
            wait = max(wait, self._requests.wait(1.0))
        if self._tokens is not None:
            self._tokens.refill(now)
            wait = max(wait, self._tokens.wait(0.0))
        if wait > 0:
            return max(wait, 0.005)
        if self._urgent and not urgent:
            return None
        return None if self.in_flight >= int(self.limit) else 0.0

    def _admit(self, loop: asyncio.AbstractEventLoop) -> Ticket:
        if self._requests is not None:
            self._requests.level -= 1.0
        else:
            self._unmetered += 1  # sent before any rate was known: counted once one is
        self.in_flight += 1
        self._stats["peak"] = max(self._stats["peak"], self.in_flight)
        ticket = Ticket(epoch=self._epoch, started=time.monotonic(), saturated=self.in_flight >= int(self.limit),
                        level=self.in_flight)
        if not self.fixed:
            ticket.timer = loop.call_later(self._straggler_after(), self._detach, ticket)
        return ticket

    def _straggler_after(self) -> float:
        return max(STRAGGLER_MIN_S, STRAGGLER_FACTOR * (self._latency or STRAGGLER_MIN_S))

    def _detach(self, ticket: Ticket) -> None:
        """A call in flight far longer than usual (hung) stops holding a slot; at most `ceiling` such calls."""
        with self._lock:
            if not ticket.holding or self._stragglers_now >= self.ceiling:
                return
            ticket.holding = False
            self.in_flight -= 1
            self._stragglers_now += 1
            self._stats["stragglers"] += 1
        self._wake_next()

    def _wake_next(self) -> None:
        """Let as many waiters re-check admission as there are free slots (at least one)."""
        with self._lock:
            free = max(1, int(self.limit) - self.in_flight)
            woken = [self._urgent.popleft() for _ in range(min(free, len(self._urgent)))]
            free -= len(woken)
            woken += [self._waiters.popleft() for _ in range(min(free, len(self._waiters)))]
        for loop, future in woken:
            loop.call_soon_threadsafe(_resolve, future)

    # --- feedback ----------------------------------------------------------------------------------------

    def release(self, ticket: Ticket, *, ok: bool = False, congested: bool = False, retry_after: float | None = None,
                headers: Mapping[str, str] | None = None, tokens: int = 0) -> None:
        """Report how an admitted request went: success (grow), 429/503 (shrink, maybe pause), or neither."""
        now = time.monotonic()
        if ticket.timer is not None:
            ticket.timer.cancel()
        with self._lock:
            if ticket.holding:
                self.in_flight -= 1
                ticket.holding = False
            else:
                self._stragglers_now -= 1
            self._stats["calls"] += 1
            if headers:
                self._read_headers(headers, now)
            if self._tokens is not None and tokens:
                self._tokens.refill(now)
                self._tokens.level -= tokens
            if ok or congested:
                self._answers.append((ticket.level, congested))
                if ticket.epoch == self._epoch:
                    answers, congestions = self._window
                    self._window = (answers + 1, congestions + int(congested))
            if ok:
                elapsed = now - ticket.started
                self._latency = elapsed if self._latency is None else 0.9 * self._latency + 0.1 * elapsed
                self._recent.append(elapsed)
                if ticket.saturated:  # a limit not in use proves nothing (the last calls of a run, a slow stage)
                    self._grow()
            elif congested:
                self._stats["congestion"] += 1
                self._shrink(ticket, now, retry_after)
        self._wake_next()

    def latency_quantile(self, q: float) -> float | None:
        """The q-quantile of recent successful latencies (seconds): the slowest while there are fewer than
        MIN_SAMPLES (a cautious guess that the first answers already make far better than none); None before
        the first answer."""
        with self._lock:
            recent = sorted(self._recent)
        if not recent:
            return None
        if len(recent) < MIN_SAMPLES:
            return recent[-1]
        return recent[min(len(recent) - 1, int(q * len(recent)))]

    def count_hedge(self) -> None:
        with self._lock:
            self._stats["hedges"] += 1

    def _grow(self) -> None:
        if self.fixed or self.limit >= self.ceiling:
            return
        if self._plateau is not None and self.limit > self._plateau + 1:
            self._plateau = None  # probed past the limit that drew the last 429: the server has room again
        if self._slow_start:
            step = 1.0
        elif self._plateau is not None and self.limit + 1 >= self._plateau:
            step = 1.0 / (self.limit * PROBE_WINDOWS)
        else:
            step = 1.0 / self.limit
        self.limit = min(float(self.ceiling), self.limit + step)
        self._stats["max_limit"] = max(self._stats["max_limit"], int(self.limit))

    def _shrink(self, ticket: Ticket, now: float, retry_after: float | None) -> None:
        if retry_after is not None and retry_after > 0 and now + retry_after > self._paused_until:
            self._stats["paused_s"] += now + retry_after - max(now, self._paused_until)
            self._paused_until = now + retry_after
        if self.fixed or ticket.epoch != self._epoch:
            return  # sent before the last cut: already accounted for
        levels = sorted(sent for sent, _ in self._answers)
        median = levels[len(levels) // 2] if levels else 0
        below = {split: self._flat_below(split) for split in (DECREASE * self.limit, median, self.limit)}
        if below[self.limit]:
            self._slow_start, self._plateau = True, None  # the cuts down to here did not help: grow back
        if any(below.values()):
            return  # as frequent with fewer in flight: not caused by our load, a cut would not help
        answers, congestions = self._window
        unknown = all(flat is None for flat in below.values()) and retry_after is None
        if unknown and congestions / max(answers, MIN_WINDOW) <= NOISE_MAX:
            return  # too few answers to tell, too few 429s for a server far over its capacity, and no Retry-After
        self._window = (0, 0)
        before = self.limit
        self._plateau = before
        self._slow_start = False
        self.limit = max(1.0, before * DECREASE)
        self._epoch += 1
        self._stats["decreases"] += 1
        self._stats["min_limit"] = min(self._stats["min_limit"], int(self.limit))
        log.info("%s: concurrency %d -> %d after a rate-limit answer", self.endpoint, int(before), int(self.limit))

    def _flat_below(self, level: float) -> bool | None:
        """Whether the recent answers to requests sent with at most `level` in flight drew 429/503s about as
        often as those sent with more (True: the share of a provider's steady noise; False: fewer below, as
        from a server that refuses none below its capacity); None without `EVIDENCE` answers on both sides."""
        below = [congested for sent, congested in self._answers if sent <= level]
        above = [congested for sent, congested in self._answers if sent > level]
        if len(below) < EVIDENCE or len(above) < EVIDENCE:
            return None
        share_below, share_above = sum(below) / len(below), sum(above) / len(above)
        return max(share_below, share_above) <= NOISE_MAX and share_below >= FLAT * share_above

    def _read_headers(self, headers: Mapping[str, str], now: float) -> None:
        """OpenAI-style x-ratelimit-* headers: the stated per-minute limits pace us, and the stated `remaining`
        corrects our own count downwards (other clients may share the key)."""
        h = {k.lower().removeprefix("llm_provider-"): str(v) for k, v in headers.items()}
        stated: list[float | None] = []
        for kind in ("requests", "tokens"):
            try:
                stated.append(float(h[f"x-ratelimit-limit-{kind}"]))
            except (KeyError, ValueError):
                stated.append(None)
        if any(stated):
            self._set_rates(stated[0], stated[1], configured=False)
        for kind, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            try:
                remaining = float(h[f"x-ratelimit-remaining-{kind}"])
            except (KeyError, ValueError):
                continue
            if bucket is not None:
                bucket.refill(now)
                bucket.level = min(bucket.level, remaining)

    def _set_rates(self, rpm: float | None, tpm: float | None, configured: bool) -> None:
        """The effective per-minute limits: the lower of the configured and the provider-stated ones."""
        if configured:
            self._configured = (rpm, tpm)
        else:
            self._stated = (rpm or self._stated[0], tpm or self._stated[1])
        now = time.monotonic()
        for index, name in enumerate(("_requests", "_tokens")):
            values = [v for v in (self._configured[index], self._stated[index]) if v and v > 0]
            if not values:
                continue
            per_minute = min(values)
            bucket: _Bucket | None = getattr(self, name)
            if bucket is None:
                spent = self._unmetered if name == "_requests" else 0
                setattr(self, name, _Bucket(per_minute=per_minute, level=per_minute - spent, updated=now))
            elif bucket.per_minute != per_minute:
                bucket.refill(now)
                bucket.per_minute, bucket.level = per_minute, min(bucket.level, per_minute)
        self.requests_per_minute = self._requests.per_minute if self._requests else None
        self.tokens_per_minute = self._tokens.per_minute if self._tokens else None

    def snapshot(self) -> LimiterStats:
        with self._lock:
            s = self._stats
            return LimiterStats(endpoint=self.endpoint, ceiling=self.ceiling, limit=int(self.limit),
                                in_flight=self.in_flight, min_limit=int(s["min_limit"]), max_limit=int(s["max_limit"]),
                                peak_in_flight=int(s["peak"]), calls=int(s["calls"]),
                                congestion=int(s["congestion"]), decreases=int(s["decreases"]),
                                paused_s=round(s["paused_s"], 3), stragglers=int(s["stragglers"]),
                                hedges=int(s["hedges"]),
                                requests_per_minute=self.requests_per_minute, tokens_per_minute=self.tokens_per_minute)

    def configure(self, ceiling: int, fixed: bool, requests_per_minute: float | None,
                  tokens_per_minute: float | None) -> None:
        """Follow the latest settings for this endpoint (another Settings object may name a new ceiling)."""
        with self._lock:
            self.ceiling, self.fixed = max(1, ceiling), fixed
            self.limit = float(self.ceiling) if fixed else min(self.limit, float(self.ceiling))
            self._set_rates(requests_per_minute, tokens_per_minute, configured=True)
        self._wake_next()

    def reset_watermarks(self) -> None:
        """Start the lowest/highest limit and the in-flight peak afresh (a new run in the same process)."""
        with self._lock:
            self._stats.update(min_limit=self.limit, max_limit=self.limit, peak=self.in_flight)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_REGISTRY: dict[str, EndpointLimiter] = {}
_REGISTRY_LOCK = threading.Lock()
COUNTERS = ("calls", "congestion", "decreases", "paused_s", "stragglers", "hedges")


def limiter_for(endpoint: str, ceiling: int, fixed: bool = False, requests_per_minute: float | None = None,
                tokens_per_minute: float | None = None) -> EndpointLimiter:
    """The one limiter of this process for an endpoint identity (model and address), created on first use."""
    with _REGISTRY_LOCK:
        limiter = _REGISTRY.get(endpoint)
        if limiter is None:
            limiter = _REGISTRY[endpoint] = EndpointLimiter(endpoint, ceiling, fixed, requests_per_minute,
                                                            tokens_per_minute)
            return limiter
    if (limiter.ceiling, limiter.fixed, limiter._configured) != (ceiling, fixed,
                                                                  (requests_per_minute, tokens_per_minute)):
        limiter.configure(ceiling, fixed, requests_per_minute, tokens_per_minute)
    return limiter


def snapshot() -> list[LimiterStats]:
    """Every endpoint limiter of this process, as it stands now."""
    with _REGISTRY_LOCK:
        limiters = list(_REGISTRY.values())
    return [limiter.snapshot() for limiter in limiters]


def start_run() -> dict[str, LimiterStats]:
    """Mark the start of a run: watermarks restart, counters are returned to subtract at the end."""
    with _REGISTRY_LOCK:
        limiters = list(_REGISTRY.values())
    for limiter in limiters:
        limiter.reset_watermarks()
    return {s.endpoint: s for s in snapshot()}


def run_stats(start: dict[str, LimiterStats]) -> list[dict[str, Any]]:
    """Per endpoint used since `start`: current limit, lowest/highest, in-flight peak, and the counters since."""
    rows = []
    for now in snapshot():
        before = start.get(now.endpoint)
        row = dataclasses.asdict(now)
        if before is not None:
            for name in COUNTERS:
                row[name] = round(row[name] - getattr(before, name), 3)
        if row["calls"]:
            rows.append(row)
    return rows


def progress_line() -> str:
    """Current limit per endpoint in use, for the CLI's progress display: 'model 48/64 (3 in flight)'."""
    parts = []
    for s in snapshot():
        if s.calls or s.peak_in_flight:
            name = s.endpoint.split("@", 1)[0]
            parts.append(f"{name} {s.limit}/{s.ceiling} ({s.in_flight} in flight)")
    return " · ".join(parts)
