"""Secure aggregation with double masking: the masks cancel for the survivors, a dropped site costs no
redo, a site never reveals both secrets of a peer, a site is sent the keys of its neighbours only, and
the settings are checked."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bayprano.actors.transport import mask_context, share_calls, unmask_calls, wire_bytes
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.federated.secagg import (
    PAIR,
    SELF,
    Advertisement,
    SecAggClient,
    SecAggServer,
    SiteRoster,
    check_settings,
    decode_fixed,
    encode_fixed,
    instance_id,
    max_abs_value,
    neighbour_graph,
    secure_sum,
    pair_mask_key,
    prg,
    self_mask,
)
from bayprano.platform.federated.shamir import Share, combine

SIZE = 4_000


def vectors(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return {f"site-{i}": rng.normal(0, 0.05, SIZE) for i in range(n)}


def masters(sites):
    return {s: os.urandom(32) for s in sites}


@pytest.mark.parametrize("neighbours", [None, 4, 2])
def test_the_masked_sum_equals_the_plain_sum(neighbours):
    xs = vectors(7)
    total = secure_sum(xs, masters(xs), "i", threshold=2, neighbours=neighbours)
    plain = np.sum(list(xs.values()), axis=0)
    assert total.dtype == torch.float64 and np.abs(total.numpy() - plain).max() < 7 * 2.0**-25 + 1e-6


@pytest.mark.parametrize("neighbours", [None, 4])
def test_sites_that_drop_after_sharing_leave_the_sum_of_the_survivors(neighbours):
    xs = vectors(7)
    total = secure_sum(
        xs, masters(xs), "i", threshold=2, neighbours=neighbours, drop_after_sharing=["site-1", "site-4"]
    )
    plain = np.sum([x for s, x in xs.items() if s not in ("site-1", "site-4")], axis=0)
    assert np.abs(total.numpy() - plain).max() < 1e-5


def _setup(n=5, threshold=3, neighbours=None, instance="inst"):
    xs = vectors(n)
    keys = masters(xs)
    clients = {s: SecAggClient(s, keys[s], instance) for s in xs}
    roster = {s: c.advertise() for s, c in clients.items()}
    server = SecAggServer(instance, roster, threshold, neighbours)
    server.route({s: c.share_keys(roster, threshold, neighbours) for s, c in clients.items()})
    return xs, keys, clients, roster, server


def test_a_masked_input_alone_is_uniform_noise_and_a_late_one_stays_hidden_after_the_unmasking():
    xs, keys, clients, roster, server = _setup()
    late = "site-2"
    masked = {s: c.mask(xs[s], roster, server.shared, None, 0, 0) for s, c in clients.items()}
    alone = decode_fixed(masked[late].values)
    assert np.median(np.abs(alone - xs[late])) > 1e9 and abs(np.corrcoef(alone, xs[late])[0, 1]) < 0.05
    on_time = {s: u for s, u in masked.items() if s != late}
    revealed = {s: clients[s].unmask(roster, list(on_time), [late], server.inbox(s), 3) for s in on_time}
    assert all(late not in answers or answers[late][0] == PAIR for answers in revealed.values())
    assert all(kind == PAIR for answers in revealed.values() for p, (kind, _) in answers.items() if p == late)
    total = server.finish(on_time, revealed)
    assert np.abs(total.numpy() - sum(xs[s] for s in on_time)).max() < 1e-5
    # the server's best use of the late input: it holds the late site's s key (from the pair shares), so
    # it strips every pairwise mask; the self-mask remains, and its seed was never revealed
    s_key = X25519PrivateKey.from_private_bytes(
        combine([Share.from_bytes(revealed[r][late][1]) for r in revealed if late in revealed[r]], 3)
    )
    y = masked[late].values.copy()
    for v in server.graph[late]:
        m = prg(pair_mask_key(s_key, roster[v].s_public, "inst", late, v), SIZE)
        y = y - m if v > late else y + m
    assert (
        np.median(np.abs(decode_fixed(y) - xs[late])) > 1e9 and abs(np.corrcoef(decode_fixed(y), xs[late])[0, 1]) < 0.05
    )
    # control: the self-mask is all that hides it (with its seed, which no site gave, the update is exact)
    exact = decode_fixed(y - self_mask(clients[late]._b, "inst", SIZE))
    assert np.abs(exact - xs[late]).max() < 2.0**-24


def test_a_site_never_gives_both_secrets_of_one_peer():
    xs, keys, clients, roster, server = _setup()
    c = clients["site-0"]
    with pytest.raises(DataError, match="refuses to unmask: site\\(s\\) site-1 listed both as survivor and as dropped"):
        c.unmask(roster, ["site-0", "site-1", "site-2"], ["site-1"], server.inbox("site-0"), 3)
    with pytest.raises(DataError, match="refuses to unmask for 2 survivor\\(s\\), fewer than 3"):
        c.unmask(roster, ["site-0", "site-1"], ["site-2"], server.inbox("site-0"), 3)
    answers = c.unmask(roster, ["site-0", "site-1", "site-2", "site-3"], ["site-4"], server.inbox("site-0"), 3)
    assert {p: k for p, (k, _) in answers.items()} == {
        "site-0": SELF,
        "site-1": SELF,
        "site-2": SELF,
        "site-3": SELF,
        "site-4": PAIR,
    }


def test_too_few_shares_refuse_the_sum_and_a_retry_has_fresh_masks():
    xs, keys, clients, roster, server = _setup(threshold=3)
    masked = {s: c.mask(xs[s], roster, server.shared, None, 0, 0) for s, c in clients.items() if s != "site-4"}
    revealed = {
        s: clients[s].unmask(roster, list(masked), ["site-4"], server.inbox(s), 3) for s in ("site-0", "site-1")
    }
    with pytest.raises(DataError, match="fewer than 3 shares for site\\(s\\)"):
        server.finish(masked, revealed)
    again = SecAggClient("site-0", keys["site-0"], instance_id("s", "update", 1, 1))
    first = SecAggClient("site-0", keys["site-0"], instance_id("s", "update", 1, 0))
    assert again.advertise().s_public != first.advertise().s_public and again._b != first._b


def test_the_neighbour_graph_is_symmetric_sparse_and_the_same_for_everyone():
    sites = [f"s{i:03d}" for i in range(100)]
    g = neighbour_graph(sites, 8, "x")
    assert all(len(v) == 8 for v in g.values())
    assert all(a in g[b] for a, vs in g.items() for b in vs)
    assert g == neighbour_graph(list(reversed(sites)), 8, "x") and g != neighbour_graph(sites, 8, "y")
    assert all(len(v) == 4 for v in neighbour_graph(sites[:5], None, "x").values())


def test_settings_are_checked_with_the_setting_named():
    assert check_settings(3) == (2, 2) and check_settings(10) == (9, 6) and check_settings(100, None, 10) == (10, 6)
    assert check_settings(2) == (1, 1)
    with pytest.raises(ConfigError, match="--secagg-threshold 5: above the 2 other site\\(s\\) of a round of 3"):
        check_settings(3, threshold=5)
    with pytest.raises(ConfigError, match="--secagg-neighbours 2: below --secagg-threshold 3"):
        check_settings(10, threshold=3, neighbours=2)
    with pytest.raises(ConfigError, match="--secure-agg needs at least 2 sites per round"):
        check_settings(1)
    with pytest.raises(ConfigError, match="--secagg-neighbours 0: must be a whole number of at least 1"):
        check_settings(5, neighbours=0)


def test_range_and_key_errors_are_clear():
    xs, keys, clients, roster, server = _setup(n=3, threshold=2)
    c = clients["site-0"]
    bound = max_abs_value(3)
    with pytest.raises(DataError, match="beyond the fixed-point range"):
        c.mask(np.array([bound * 1.01]), roster, server.shared, None, 0, 0)
    with pytest.raises(DataError, match="contains NaN or infinite values"):
        c.mask(np.array([np.nan]), roster, server.shared, None, 0, 0)
    bad = dict(roster)
    bad["site-0"] = clients["site-1"].advertise()
    with pytest.raises(DataError, match="roster entry for 'site-0' is not an advertisement"):
        c.mask(np.zeros(3), bad, server.shared, None, 0, 0)
    tampered = {k: v[:-1] + bytes([v[-1] ^ 1]) for k, v in server.inbox("site-0").items()}
    with pytest.raises(DataError, match="do not decrypt"):
        c.unmask(roster, list(roster), [], tampered, 2)
    assert np.array_equal(decode_fixed(encode_fixed(np.array([-1.5, 2.25]), 4), 4), [-1.5, 2.25])


# what a site is sent: the requests of the Coordinator's transport, run through the sites

ID_BYTES = 12  # the most one more site id adds to a pickled id list ("site-29": 7 characters, 3 of framing)


def _run_requests(n, neighbours, dropped=("site-1",)):
    """One instance over ``n`` sites driven by the transport's requests, ``dropped`` leaving after sharing:
    the server and every request it sent, {stage: {site: message}} (for the masked input, the context)."""
    xs = {s: x[:64] for s, x in vectors(n).items()}
    clients = {s: SecAggClient(s, os.urandom(32), "inst") for s in xs}
    _, threshold = check_settings(n, None, neighbours)
    server = SecAggServer("inst", {s: c.advertise() for s, c in clients.items()}, threshold, neighbours)
    share = {s: args for s, (_, args) in share_calls(server).items()}
    server.route({s: clients[s].share_keys(*args[1:]) for s, args in share.items()})
    mask = {s: mask_context(server, s, 0, 0) for s in server.shared}
    masked = {
        s: clients[s].mask(xs[s], c.roster, c.shared, c.neighbours, c.round, c.attempt)
        for s, c in mask.items()
        if s not in dropped
    }
    unmask = {s: args for s, (_, args) in unmask_calls(server, sorted(masked)).items()}
    revealed = {s: clients[s].unmask(*args[1:]) for s, args in unmask.items()}
    total = server.finish(masked, revealed)
    assert np.abs(total.numpy() - sum(xs[s] for s in masked)).max() < 1e-5
    return server, clients, {"share": share, "mask": mask, "unmask": unmask}


def _advertisements(message) -> list[Advertisement]:
    """Every advertisement anywhere in ``message``, whatever holds it."""
    if isinstance(message, Advertisement):
        return [message]
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return [a for f in dataclasses.fields(message) for a in _advertisements(getattr(message, f.name))]
    if isinstance(message, dict):
        return [a for k, v in message.items() for a in _advertisements(k) + _advertisements(v)]
    if isinstance(message, (list, tuple, set, frozenset)):
        return [a for v in message for a in _advertisements(v)]
    return []


def _parts(message) -> list:
    """The top-level parts of a request: a dataclass's fields, or a call's arguments."""
    if dataclasses.is_dataclass(message):
        return [getattr(message, f.name) for f in dataclasses.fields(message)]
    return list(message)


def _id_lists(message) -> int:
    """How many lists of site ids a request carries (the roster's, U2, survivors, dropped)."""
    return sum(
        isinstance(p, SiteRoster) or (isinstance(p, (list, tuple)) and all(isinstance(x, str) for x in p))
        for p in _parts(message)
    )


@pytest.mark.parametrize("n", [12, 30])
@pytest.mark.parametrize("neighbours", [4, None])
def test_every_request_carries_the_keys_of_the_site_and_its_neighbours_only(n, neighbours):
    server, _, sent = _run_requests(n, neighbours)
    for stage, by_site in sent.items():
        assert set(by_site) == set(server.roster) - ({"site-1"} if stage == "unmask" else set())
        for site, message in by_site.items():
            found = _advertisements(message)
            assert sorted(a.site_id for a in found) == sorted({site, *server.graph[site]}), (stage, site)
            assert len(found) == (5 if neighbours else n), (stage, site)
            (roster,) = [p for p in _parts(message) if isinstance(p, SiteRoster)]
            assert roster.sites == tuple(sorted(server.roster))  # the ids: every site computes the graph


def test_a_sites_download_grows_with_the_sites_by_their_ids_only():
    small, _, at_12 = _run_requests(12, 4)
    large, _, at_30 = _run_requests(30, 4)
    for stage in ("share", "mask", "unmask"):
        biggest_12 = max(wire_bytes(m) for m in at_12[stage].values())
        biggest_30 = max(wire_bytes(m) for m in at_30[stage].values())
        lists = _id_lists(at_30[stage]["site-0"])
        assert (biggest_30 - biggest_12) / (30 - 12) <= ID_BYTES * lists, (stage, biggest_12, biggest_30, lists)
    # control: the whole roster, as every request carried it before, grows by an advertisement a site,
    # beyond any of those bounds
    whole = (wire_bytes(large.roster) - wire_bytes(small.roster)) / (30 - 12)
    assert whole > ID_BYTES * max(_id_lists(at_30[stage]["site-0"]) for stage in at_30) + ID_BYTES


def test_a_roster_without_a_neighbours_keys_is_refused_naming_the_neighbour():
    server, clients, sent = _run_requests(12, 4)
    site = "site-0"
    c = clients[site]
    missing = server.graph[site][0]
    full = sent["share"][site][1]
    # the server names the neighbour among the sites but withholds its keys
    short = SiteRoster(tuple(a for a in full.advertisements if a.site_id != missing), (*full.other_sites, missing))
    refusal = f"site '{site}': the roster has no advertisement of its neighbour\\(s\\) {missing}$"
    with pytest.raises(DataError, match=refusal):
        c.share_keys(short, server.threshold, 4)
    context = sent["mask"][site]
    with pytest.raises(DataError, match=refusal):
        c.mask(np.zeros(64), short, context.shared, 4, 0, 0)
    _, _, survivors, dropped, inbox, threshold, _ = sent["unmask"][site]
    with pytest.raises(DataError, match=refusal):
        c.unmask(short, survivors, dropped, inbox, threshold, 4)
    twice = SiteRoster(full.advertisements, (*full.other_sites, missing))
    with pytest.raises(DataError, match=f"the roster lists site\\(s\\) {missing} more than once"):
        c.share_keys(twice, server.threshold, 4)
    # its own entry must be its own keys
    impostor = SecAggClient(site, os.urandom(32), "inst").advertise()
    others = tuple(a for a in full.advertisements if a.site_id != site)
    with pytest.raises(DataError, match="site 'site-0' is not in the roster with its own keys"):
        c.share_keys(SiteRoster((impostor, *others), full.other_sites), server.threshold, 4)
    # keys of sites that are not neighbours are not used: the whole roster gives the same shares
    assert c.share_keys(server.roster, server.threshold, 4) == c.share_keys(full, server.threshold, 4)
