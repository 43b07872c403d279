"""The ingress's queue limit: tokens accepted and not yet answered, and how long a refused
client should wait (``Retry-After``). Pure; one per ingress replica, used from its event loop.

A request is refused when taking it would put more than ``max_tokens`` in flight, unless
nothing is in flight: a request larger than the limit is then taken alone, so no request
size is refused for ever. The wait asked of a refused client is the time the replica needs to
answer what it holds, at the rate it answered tokens over the last :data:`RATE_WINDOW_S` (or
since its first request, when that is more recent; idle time counts, so the wait asked errs
long).
"""

from __future__ import annotations

import collections
import math
import time

RATE_WINDOW_S = 10.0
MAX_RETRY_AFTER_S = 60


class QueueFull(Exception):
    """Taking the request would exceed the limit; ``retry_after`` is in whole seconds."""

    def __init__(self, queued: int, limit: int, retry_after: int) -> None:
        super().__init__(f"the service holds {queued} tokens, at its limit of {limit}; retry "
                         f"after {retry_after} s")
        self.queued, self.limit, self.retry_after = queued, limit, retry_after


class Admission:
    """Counts the tokens in flight and the tokens answered lately."""

    def __init__(self, max_tokens: int, clock=time.monotonic) -> None:
        self.max_tokens = max_tokens
        self.queued = 0
        self._clock = clock
        self._first: float | None = None  # when the first request was taken
        self._done: collections.deque[tuple[float, int]] = collections.deque()

    def admit(self, tokens: int) -> None:
        """Take ``tokens`` or raise :class:`QueueFull`."""
        if self.queued and self.queued + tokens > self.max_tokens:
            raise QueueFull(self.queued, self.max_tokens, self.retry_after())
        if self._first is None:
            self._first = self._clock()
        self.queued += tokens

    def release(self, tokens: int, answered: bool = True) -> None:
        """``tokens`` taken earlier left the queue (answered, or failed: not counted as rate)."""
        self.queued -= tokens
        if answered:
            self._done.append((self._clock(), tokens))

    def rate(self) -> float:
        """Tokens answered per second over the last window (0 when none)."""
        now = self._clock()
        while self._done and self._done[0][0] < now - RATE_WINDOW_S:
            self._done.popleft()
        if not self._done:
            return 0.0
        span = min(RATE_WINDOW_S, now - self._first)
        return sum(t for _, t in self._done) / max(span, 1e-3)

    def retry_after(self) -> int:
        """Seconds to drain what is queued at the recent rate, 1 to :data:`MAX_RETRY_AFTER_S`."""
        rate = self.rate()
        if rate <= 0:
            return 1
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.queued / rate)))
