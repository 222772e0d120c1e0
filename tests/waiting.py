"""Waiting in tests: poll a condition until it holds or a deadline passes, then fail naming what was awaited.

Every wait in a test has a deadline and a message that says what did not happen; ``poll`` is the loop,
``wait_until`` the assertion on top of it.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def poll(check: Callable[[], Optional[T]], timeout: float, every: float = 0.1) -> Optional[T]:
    """Call ``check()`` every ``every`` seconds until it returns something truthy, and return that; return
    the last (falsy) result once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)


def wait_until(
    check: Callable[[], Optional[T]],
    what: str,
    timeout: float = 60.0,
    every: float = 0.1,
    detail: Optional[Callable[[], str]] = None,
) -> T:
    """``poll(check)``, failing with ``what`` (and ``detail()``, what was seen last) when it never holds;
    returns ``check()``'s truthy result."""
    result = poll(check, timeout, every)
    if not result:
        seen = f"; {detail()}" if detail is not None else ""
        raise AssertionError(f"{what}: not reached within {timeout:g}s{seen}")
    return result
