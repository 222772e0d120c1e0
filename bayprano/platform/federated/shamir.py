"""Shamir secret sharing over a prime field, for secure aggregation's dropout recovery.

A secret of up to 64 bytes is read as an integer s below the Mersenne prime p = 2**521 - 1; ``split``
draws a random polynomial f of degree t - 1 with f(0) = s (coefficients from the operating system's
random source, or from a caller's ``rng`` for reproducible simulations) and gives share i the point
(i, f(i)) for i = 1..n. Any t shares determine f, and ``combine`` recovers s = f(0) by Lagrange
interpolation at 0; fewer than t shares are consistent with every secret equally (each value of f(0)
is matched by exactly one polynomial through them), so they say nothing about it.
``combine`` refuses fewer than ``threshold`` shares, shares of different secrets' lengths, and two
shares at the same point. Pure Python integers: no numpy, no Ray.
"""

from __future__ import annotations

import numbers
import secrets
from dataclasses import dataclass
from typing import Callable, Sequence

from bayprano.platform.errors import ConfigError, DataError

PRIME = 2**521 - 1  # a Mersenne prime: every 64-byte secret is an element of the field
MAX_SECRET_BYTES = 64
SHARE_VALUE_BYTES = 66  # a field element, big-endian


@dataclass(frozen=True)
class Share:
    """The point (x, y) of a sharing polynomial, and the byte length of the secret it is a share of."""

    x: int
    y: int
    length: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(4, "big") + self.length.to_bytes(1, "big") + self.y.to_bytes(SHARE_VALUE_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Share":
        if len(data) != 5 + SHARE_VALUE_BYTES:
            raise DataError(f"shamir: a share is {5 + SHARE_VALUE_BYTES} bytes, got {len(data)}")
        x, length, y = int.from_bytes(data[:4], "big"), data[4], int.from_bytes(data[5:], "big")
        if not 1 <= x < PRIME or not 0 <= y < PRIME or not 0 < length <= MAX_SECRET_BYTES:
            raise DataError("shamir: share out of range")
        return cls(x, y, length)


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"shamir: {name} must be an integer of at least {minimum}, got {value!r}")
    return int(value)


def split(secret: bytes, threshold: int, num_shares: int, rng: Callable[[int], int] | None = None) -> list[Share]:
    """``num_shares`` shares of ``secret``, any ``threshold`` of which recover it.

    ``rng(bits)`` gives a random integer of that many bits (default ``secrets.randbits``); a
    coefficient drawn at or above the prime is drawn again.
    """
    if not isinstance(secret, (bytes, bytearray)) or not 0 < len(secret) <= MAX_SECRET_BYTES:
        raise ConfigError(f"shamir: a secret is 1 to {MAX_SECRET_BYTES} bytes")
    t = _count("threshold", threshold, 1)
    n = _count("num_shares", num_shares, 1)
    if t > n:
        raise ConfigError(
            f"shamir: threshold {t} is above the number of shares {n}: the secret could never be recovered"
        )
    draw = rng or secrets.randbits
    coefficients = [int.from_bytes(bytes(secret), "big")]
    while len(coefficients) < t:
        c = draw(521)
        if c < PRIME:
            coefficients.append(c)
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y, len(secret)))
    return shares


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (the first ``threshold`` are used)."""
    t = _count("threshold", threshold, 1)
    shares = list(shares)
    if len(shares) < t:
        raise DataError(f"shamir: {len(shares)} share(s), the threshold is {t}: the secret cannot be recovered")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise DataError("shamir: two shares at the same point")
    lengths = {s.length for s in shares}
    if len(lengths) != 1:
        raise DataError(f"shamir: shares of secrets of different lengths {sorted(lengths)}")
    used = shares[:t]
    secret = 0
    for i, si in enumerate(used):
        num, den = 1, 1
        for j, sj in enumerate(used):
            if i != j:
                num = num * (-sj.x) % PRIME
                den = den * (si.x - sj.x) % PRIME
        secret = (secret + si.y * num * pow(den, -1, PRIME)) % PRIME
    length = lengths.pop()
    if secret >= 256**length:
        raise DataError("shamir: the shares do not belong to one secret (the interpolated value is out of range)")
    return secret.to_bytes(length, "big")
