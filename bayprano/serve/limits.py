"""What the gateway lets one request or one token hold: shared budgets and per-token limits.

``Budget`` is a quantity (request bytes, decoded pixels) that requests reserve for as long as they hold it;
a reservation waits for room until the request's deadline and is then answered 429 with ``Retry-After``.
``TokenLimits`` is a token-bucket rate limit and a concurrency limit per token, both answered 429 with
``Retry-After``. Both are per gateway replica and live on its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import AsyncIterator, Iterator

from bayprano.serve.api import ApiError


class Budget:
    """A quantity (bytes, pixels) that requests reserve and give back; a reservation waits for room until
    its deadline."""

    def __init__(self, capacity: int, what: str):
        self.capacity, self.what, self.used = int(capacity), what, 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int, deadline: float) -> AsyncIterator[None]:
        amount = int(amount)
        async with self._changed:
            while self.used + amount > self.capacity:
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise asyncio.TimeoutError
                    await asyncio.wait_for(self._changed.wait(), timeout=left)
                except asyncio.TimeoutError:
                    raise ApiError(
                        429,
                        "busy",
                        f"the server is holding its limit of {self.what}; retry later",
                        {"Retry-After": "1"},
                    ) from None
            self.used += amount
        try:
            yield
        finally:
            async with self._changed:
                self.used -= amount
                self._changed.notify_all()


class TokenLimits:
    """Per-token token-bucket rate limit and concurrency limit (per gateway replica)."""

    def __init__(self, rate: float, burst: int, concurrency: int):
        self.rate, self.burst, self.concurrency = float(rate), int(burst), int(concurrency)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._active: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        now = time.monotonic()
        level, last = self._buckets.get(key, (float(self.burst), now))
        level = min(float(self.burst), level + (now - last) * self.rate)
        if level < 1.0:
            self._buckets[key] = (level, now)
            wait = math.ceil((1.0 - level) / self.rate)
            raise ApiError(
                429,
                "rate_limited",
                f"more than {self.rate:g} requests per second with this token; retry in {wait} s",
                {"Retry-After": str(wait)},
            )
        if self._active.get(key, 0) >= self.concurrency:
            self._buckets[key] = (level, now)
            raise ApiError(
                429,
                "too_many_concurrent",
                f"more than {self.concurrency} requests at once with this token; retry when one has finished",
                {"Retry-After": "1"},
            )
        self._buckets[key] = (level - 1.0, now)
        if len(self._buckets) > 100_000:  # forget idle tokens
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60 or k in self._active}
        self._active[key] = self._active.get(key, 0) + 1
        try:
            yield
        finally:
            self._active[key] -= 1
            if not self._active[key]:
                del self._active[key]
