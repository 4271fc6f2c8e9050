"""Live call counts per stage, for whoever listens (the CLI's progress bars); costs nothing unheard."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

Listener = Callable[[str, Counter[str]], None]
_listeners: list[Listener] = []
_totals: dict[str, Counter[str]] = {}
_lock = threading.Lock()


def add_listener(listener: Listener) -> Callable[[], None]:
    """Register a listener; returns a function that removes it."""
    with _lock:
        _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def report_calls(stage: str, done: int = 0, cached: int = 0, failed: int = 0) -> None:
    with _lock:
        counts = _totals.setdefault(stage, Counter())
        counts.update(done=done + cached, cached=cached, failed=failed)
        snapshot = Counter(counts)
        listeners = list(_listeners)
    for listener in listeners:
        listener(stage, snapshot)
