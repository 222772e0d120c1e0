"""Secure aggregation: the masks cancel in the sum, hide each update, and a broken round is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.federated.secagg import (
    SecAggSite,
    aggregate,
    decode_fixed,
    encode_fixed,
    max_abs_value,
)

SIZE = 10_000


def make_sites(n=5):
    sites = {f"site-{i}": SecAggSite(f"site-{i}") for i in range(n)}
    keys = {sid: s.public_key_bytes() for sid, s in sites.items()}
    return sites, keys


def updates(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return {f"site-{i}": (rng.normal(0, 0.05, SIZE) * rng.uniform(0.5, 2)).astype(np.float32) for i in range(n)}


def test_the_masked_sum_equals_the_plain_sum_for_five_sites():
    sites, keys = make_sites()
    xs = updates()
    masked = [sites[sid].mask(torch.from_numpy(x), round=3, peers=keys) for sid, x in xs.items()]
    total = aggregate(masked, expected_sites=list(sites), round=3)
    plain = np.sum([x.astype(np.float64) for x in xs.values()], axis=0)
    assert total.dtype == torch.float32 and total.shape == (SIZE,)
    err = np.abs(total.numpy() - plain).max()
    assert err < 1e-4
    assert err < 5 * 2.0**-25 + 1e-6  # five roundings of at most 2^-25 each, plus float32 output


def test_one_masked_update_alone_reveals_nothing_useful():
    sites, keys = make_sites()
    x = updates()["site-2"]
    u = sites["site-2"].mask(x, round=0, peers=keys)
    alone = decode_fixed(u.values, u.fractional_bits)
    assert np.median(np.abs(alone - x)) > 1e9  # the masks are as large as the whole 64-bit range
    assert abs(np.corrcoef(alone, x)[0, 1]) < 0.05
    top = (u.values >> np.uint64(60)).astype(int)  # the top 4 bits are uniform over 16 values
    counts = np.bincount(top, minlength=16)
    assert np.all(np.abs(counts - SIZE / 16) < 6 * np.sqrt(SIZE / 16))
    assert abs(float(((u.values >> np.uint64(63)) & np.uint64(1)).mean()) - 0.5) < 0.03


def test_both_parties_of_a_pair_derive_the_same_mask_and_nobody_else_does():
    sites, keys = make_sites(3)
    a, b, c = sites["site-0"], sites["site-1"], sites["site-2"]
    ab = a.pair_mask("site-1", keys["site-1"], round=4, length=64)
    assert np.array_equal(ab, b.pair_mask("site-0", keys["site-0"], round=4, length=64))
    assert ab.dtype == np.uint64
    assert not np.array_equal(ab, a.pair_mask("site-2", keys["site-2"], round=4, length=64))
    assert not np.array_equal(ab, a.pair_mask("site-1", keys["site-1"], round=5, length=64))
    assert not np.array_equal(ab, a.pair_mask("site-1", keys["site-1"], round=4, length=64, attempt=1))
    restarted = SecAggSite("site-0", private_key=bytes(range(32)))
    same = SecAggSite("site-0", private_key=bytes(range(32)))
    assert restarted.public_key_bytes() == same.public_key_bytes()


def test_a_site_that_dropped_after_masking_makes_the_round_fail_and_a_redo_without_it_works():
    sites, keys = make_sites()
    xs = updates()
    masked = {sid: sites[sid].mask(x, round=1, peers=keys) for sid, x in xs.items()}
    survivors = [u for sid, u in masked.items() if sid != "site-3"]
    garbage = decode_fixed(np.sum([u.values for u in survivors], axis=0), 24)
    assert np.abs(garbage).max() > 1e6  # what a silent sum would have returned
    with pytest.raises(DataError, match="no update from site\\(s\\) site-3: their masks do not cancel"):
        aggregate(survivors, expected_sites=list(sites))
    with pytest.raises(DataError, match="site 'site-0' already masked an update for round 1 attempt 0"):
        sites["site-0"].mask(xs["site-0"], round=1, peers=keys)
    alive = {sid: k for sid, k in keys.items() if sid != "site-3"}
    redo = [sites[sid].mask(xs[sid], round=1, peers=alive, attempt=1) for sid in alive]
    total = aggregate(redo, expected_sites=list(alive), round=1, attempt=1)
    plain = np.sum([xs[sid].astype(np.float64) for sid in alive], axis=0)
    assert np.abs(total.numpy() - plain).max() < 1e-4


def test_mismatched_rounds_peers_or_duplicates_are_refused():
    sites, keys = make_sites(3)
    xs = updates(3)
    a = sites["site-0"].mask(xs["site-0"], round=7, peers=keys)
    b = sites["site-1"].mask(xs["site-1"], round=7, peers=keys)
    c_old = sites["site-2"].mask(xs["site-2"], round=6, peers=keys)
    with pytest.raises(DataError, match="site 'site-2' sent round 6 attempt 0, expected round 7 attempt 0"):
        aggregate([a, b, c_old], expected_sites=list(sites))
    with pytest.raises(DataError, match="site 'site-0' sent round 7 attempt 0, expected round 8 attempt 0"):
        aggregate([a, b, c_old], expected_sites=list(sites), round=8)
    pair = {k: keys[k] for k in ("site-0", "site-2")}
    c_pair = sites["site-2"].mask(xs["site-2"], round=7, peers=pair)
    with pytest.raises(DataError, match=r"site 'site-2' masked for sites \['site-0', 'site-2'\], expected"):
        aggregate([a, b, c_pair], expected_sites=list(sites))
    with pytest.raises(DataError, match="more than one update from site\\(s\\) site-0"):
        aggregate([a, a, b], expected_sites=list(sites))
    with pytest.raises(DataError, match="update\\(s\\) from unexpected site\\(s\\) site-1"):
        aggregate([a, b, c_old], expected_sites=["site-0", "site-2"])


def test_range_key_and_size_errors_are_clear():
    sites, keys = make_sites(2)
    s = sites["site-0"]
    bound = max_abs_value(2)
    assert bound == 2.0**38 / 2
    with pytest.raises(DataError, match="beyond the fixed-point range"):
        s.mask(np.array([bound * 1.01]), round=0, peers=keys)
    with pytest.raises(ConfigError, match="has no peers in round 0: with fewer than 2 sites the update would be sent in the clear"):
        s.mask(np.zeros(3), round=0, peers={"site-0": keys["site-0"]})
    with pytest.raises(DataError, match="site 'site-9': a public key is 32 raw bytes"):
        s.mask(np.zeros(3), round=0, peers={"site-9": b"short"})
    with pytest.raises(DataError, match="site 'site-9': public key is not a usable X25519 key"):
        s.mask(np.zeros(3), round=1, peers={"site-9": bytes(32)})
    with pytest.raises(DataError, match="contains NaN or infinite values"):
        s.mask(np.array([np.nan]), round=2, peers=keys)
    with pytest.raises(ConfigError, match="round must be an integer of at least 0, got -1"):
        s.mask(np.zeros(3), round=-1, peers=keys)


def test_sums_right_at_the_overflow_bound_still_decode_exactly():
    bits, n = 40, 3
    bound = max_abs_value(n, bits)  # 2^22 / 3
    sites = {f"s{i}": SecAggSite(f"s{i}", fractional_bits=bits) for i in range(n)}
    keys = {sid: s.public_key_bytes() for sid, s in sites.items()}
    x = np.array([bound, -bound, 0.5])
    total = decode_fixed(np.sum([s.mask(x, round=0, peers=keys).values for s in sites.values()], axis=0), bits)
    np.testing.assert_allclose(total, n * x, rtol=1e-12)
    assert np.array_equal(decode_fixed(encode_fixed(np.array([-1.5, 2.25]), 4), 4), [-1.5, 2.25])
