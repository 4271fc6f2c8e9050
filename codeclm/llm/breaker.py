"""A circuit breaker per endpoint that resumes: an endpoint that stops answering pauses its calls instead of
failing them, and the run carries on when it is back.

closed: calls go out; `failures` connection failures in a row (refused, reset, timed out) open it.
open: no call goes out; every `probe_s` one call is let through as a probe (half-open).
half-open → closed when the probe reaches the server (any HTTP answer), → open again when it does not.
An endpoint open for longer than `stop_after` seconds stops the run with one line; completed calls are cached,
so a rerun pays only for the rest. One breaker per endpoint identity per process, like its limiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass

from codeclm.errors import ModelError

log = logging.getLogger(__name__)
POLL_S = 1.0  # longest a paused call sleeps before looking at the breaker again (closing wakes it at once)


@dataclass(frozen=True)
class BreakerPolicy:
    failures: int  # connection failures in a row that open the breaker
    probe_s: float  # seconds between probes while open
    stop_after: float  # seconds open before the run stops


class Breaker:
    """The breaker of one endpoint; used from the gateway's one event loop (a lock keeps it thread-safe)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.failures = 0
        self.opened_at: float | None = None
        self.openings = 0
        self._next_probe = 0.0
        self._probing = False
        self._lock = threading.Lock()
        self._closed: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []  # what paused calls wait on

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    async def admit(self, policy: BreakerPolicy, where: str) -> tuple[bool, float]:
        """Wait while the breaker is open; returns (this request is the probe, seconds waited). Raises the
        run-stopping ModelError once the endpoint has been unreachable for `policy.stop_after` seconds."""
        start = time.monotonic()
        while True:
            with self._lock:
                now = time.monotonic()
                if self.opened_at is None:
                    return False, now - start
                down = now - self.opened_at
                if down > policy.stop_after:
                    raise ModelError(f"{where} has been unreachable for {down:.0f}s (breaker_stop_after = "
                                     f"{policy.stop_after:.0f}s); stopping: completed calls are kept, run again "
                                     "to resume")
                if not self._probing and now >= self._next_probe:
                    self._probing = True
                    return True, now - start
                nap = min(POLL_S, max(0.01, self._next_probe - now), max(0.01, policy.stop_after - down + 0.01))
                loop = asyncio.get_running_loop()
                closed = next((e for lp, e in self._closed if lp is loop), None)
                if closed is None:
                    closed = asyncio.Event()
                    self._closed.append((loop, closed))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), timeout=nap)

    def reached(self, probe: bool) -> None:
        """The server answered (whatever it said): the endpoint is up."""
        with self._lock:
            self.failures = 0
            if probe:
                self._probing = False
            if self.opened_at is not None:
                log.warning("%s answers again after %.0fs; resuming its calls", self.endpoint,
                            time.monotonic() - self.opened_at)
                self.opened_at = None
                closed, self._closed = self._closed, []
                for loop, event in closed:
                    loop.call_soon_threadsafe(event.set)

    def unreachable(self, probe: bool, policy: BreakerPolicy) -> None:
        """A request could not reach the server: count it, open the breaker, or schedule the next probe."""
        with self._lock:
            now = time.monotonic()
            self.failures += 1
            if probe:
                self._probing = False
                self._next_probe = now + policy.probe_s
            elif self.opened_at is None and self.failures >= policy.failures:
                self.opened_at, self._next_probe = now, now + policy.probe_s
                self.openings += 1
                log.warning("%s: %d requests in a row could not reach it; pausing its calls and probing every "
                            "%.0fs (for up to %.0fs)", self.endpoint, self.failures, policy.probe_s,
                            policy.stop_after)

    def release_probe(self, probe: bool) -> None:
        """A probe that ended without an answer either way (cancelled): let another call probe."""
        if probe:
            with self._lock:
                self._probing = False


_REGISTRY: dict[str, Breaker] = {}
_REGISTRY_LOCK = threading.Lock()


def breaker_for(endpoint: str) -> Breaker:
    """The one breaker of this process for an endpoint identity."""
    with _REGISTRY_LOCK:
        if endpoint not in _REGISTRY:
            _REGISTRY[endpoint] = Breaker(endpoint)
        return _REGISTRY[endpoint]
