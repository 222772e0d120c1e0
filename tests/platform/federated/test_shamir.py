"""Shamir sharing: any t shares recover the secret, fewer say nothing about it."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.federated.shamir import PRIME, Share, combine, split


def test_any_t_of_n_shares_recover_the_secret():
    secret = os.urandom(32)
    shares = split(secret, 3, 5)
    assert [s.x for s in shares] == [1, 2, 3, 4, 5]
    for subset in itertools.combinations(shares, 3):
        assert combine(list(subset), 3) == secret
    assert combine(shares, 3) == secret  # more than t: the first t are used
    assert combine([Share.from_bytes(s.to_bytes()) for s in shares[2:]], 3) == secret


def test_below_the_threshold_is_refused_and_interpolating_anyway_gives_another_value():
    secret = bytes(range(32))
    shares = split(secret, 4, 6)
    with pytest.raises(DataError, match="3 share\\(s\\), the threshold is 4: the secret cannot be recovered"):
        combine(shares[:3], 4)
    try:
        guessed = combine(shares[:3], 3)  # a degree-2 fit through 3 points of a degree-3 polynomial
    except DataError:
        guessed = None  # the fit left the range of 32-byte secrets
    assert guessed != secret


def test_fewer_than_t_shares_are_consistent_with_every_secret():
    """For two shares of a 3-of-n sharing, each candidate secret has one polynomial through them."""
    shares = split(b"\x01" * 32, 3, 5, rng=random.Random(1).getrandbits)
    s1, s2 = shares[0], shares[1]
    for candidate in (0, 12345, 2**200):  # f(0) = candidate, f(1) = y1, f(2) = y2 fixes f of degree 2
        a0 = candidate
        # f(x) = a0 + a1 x + a2 x^2: solve a1, a2 from the two shares
        r1, r2 = (s1.y - a0) % PRIME, (s2.y - a0) % PRIME
        a2 = (r2 - 2 * r1) * pow(2, -1, PRIME) % PRIME
        a1 = (r1 - a2) % PRIME
        f = lambda x: (a0 + a1 * x + a2 * x * x) % PRIME  # noqa: E731
        assert f(1) == s1.y and f(2) == s2.y


def test_seeded_draws_are_reproducible_and_bad_input_is_named():
    a = split(b"k" * 32, 2, 3, rng=random.Random(7).getrandbits)
    b = split(b"k" * 32, 2, 3, rng=random.Random(7).getrandbits)
    assert a == b
    with pytest.raises(ConfigError, match="threshold 4 is above the number of shares 3"):
        split(b"k", 4, 3)
    with pytest.raises(ConfigError, match="threshold must be an integer of at least 1, got 0"):
        split(b"k", 0, 3)
    with pytest.raises(DataError, match="two shares at the same point"):
        combine([a[0], a[0]], 2)
    with pytest.raises(DataError, match="a share is 71 bytes"):
        Share.from_bytes(b"short")
