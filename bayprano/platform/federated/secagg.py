"""Dropout-robust secure aggregation: the server learns the sum of the surviving sites' vectors, nothing else.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017),
double masking, for an honest-but-curious server that relays messages faithfully, over a sparse
neighbour graph as in SecAgg+ (Bell et al., CCS 2020; Flower's ``secaggplus``). One run of the
protocol (an *instance*: a session, a purpose such as a round's update or its validation summary, a
round and an attempt) has four steps:

1. Advertise (``SecAggClient.advertise``): each site derives two fresh X25519 key pairs for this
   instance, ``c`` (to encrypt shares to its peers) and ``s`` (for pairwise masks), and a private
   self-mask seed ``b``, all from a 32-byte master secret that never leaves it; it sends the two
   public keys.
2. Share keys (``share_keys``): the server sends each site its view of the roster (``SiteRoster``,
   ``SecAggServer.roster_for``): the advertisements of the site itself and of its neighbours and the
   ids of the other sites that advertised, nothing more, so that a site's download grows with k (and
   by one short id a site with N). Each site computes its neighbours from the ids and the instance
   (``neighbour_graph``: every other site, or ``neighbours`` of them on a ring in an order drawn from
   the instance, so a site's cost grows with k, not with N), checks that its own entry is its own
   keys and that it got every neighbour's (a missing one is refused, by name; an advertisement of a
   site that is not a neighbour is ignored), splits ``b`` and its ``s`` private key into Shamir shares
   held by itself and its k neighbours (any t recover either) and sends each neighbour's pair of
   shares encrypted to it (ChaCha20-Poly1305 under a key from the ``c`` agreement): the server only
   relays them.
3. Masked input (``mask``): the server asks the sites that shared (U2), each with its view of the
   roster and the ids of U2. A site sends y = x + PRG(b) + sum over its neighbours v in U2 of
   +-PRG(s_uv), in fixed point modulo 2**64 (PRG: ChaCha20 keystream; s_uv from the ``s`` agreement
   through HKDF; + when v's id sorts after u's).
4. Unmask (``unmask``): the sites whose masked input arrived are the survivors (U3); the others of U2
   dropped. The server asks the survivors, each with its view of the roster, the ids of the survivors
   and of the dropped sites and the ciphertexts addressed to it: for each neighbour that survived, its
   share of b; for each that dropped, its share of the ``s`` private key (shares from a site that is
   not its neighbour are refused). A site answers once per instance and never gives both kinds for
   one peer (a peer listed both as survivor and as dropped, or a second request, is refused), so the
   server never holds both secrets of one site. With t shares the server
   (``SecAggServer.finish``) removes every survivor's self-mask and the pairwise masks that survivors
   shared with dropped sites: what remains is the survivors' sum.

A site that drops after masking therefore costs no redo. A late masked input that arrives after the
unmasking is useless to the server: it can strip its pairwise masks (it holds that site's ``s`` key)
but not its self-mask, whose seed it never learns. Every instance (so every retry, under the next
attempt number) has fresh keys, a fresh b and fresh masks.

Fixed point: ``round(x * 2**f)`` as a 64-bit two's complement integer (default f = 24); ``mask``
refuses any |x| > ``max_abs_value(n, f)`` = 2**(62 - f) / n, so a sum over n sites decodes exactly.

Settings (``check_settings``): ``threshold`` t (default: a majority of a secret's k + 1 holders,
floor((k + 1) / 2) + 1, at most k, since a dropped site's own share is lost with it) and ``neighbours`` k (default: every other site of the round, which is Bonawitz's
full graph, the k = n - 1 case). Out of scope: a server that lies about the roster or the survivors
(Bonawitz's consistency round with signatures), and sites that collude with the server in groups of
t or more.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import Tensor

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.federated.shamir import Share, combine, split

PROTOCOL = "bayprano-secagg/v2"
DEFAULT_FRACTIONAL_BITS = 24
MIN_SITES = 2  # a sum over one site is that site's value
SELF = "self"  # the kinds of share a survivor reveals for a peer
PAIR = "pair"


# ----------------------------------------------------------------------------------- settings


def _check_bits(fractional_bits: int) -> int:
    if (
        isinstance(fractional_bits, bool)
        or not isinstance(fractional_bits, numbers.Integral)
        or not 0 <= fractional_bits <= 52
    ):
        raise ConfigError(f"secure aggregation: fractional_bits must be an integer in [0, 52], got {fractional_bits!r}")
    return int(fractional_bits)


def _check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"secure aggregation: {name} must be an integer of at least {minimum}, got {value!r}")
    return int(value)


def _check_site_id(site_id) -> str:
    if not isinstance(site_id, str) or not site_id:
        raise ConfigError(f"secure aggregation: a site id must be a non-empty string, got {site_id!r}")
    return site_id


def degree(num_sites: int, neighbours: int | None) -> int:
    """A site's number of neighbours among ``num_sites``: ``neighbours`` rounded up to even (a ring
    lattice), at most every other site; every other site when ``neighbours`` is None."""
    if neighbours is None or neighbours >= num_sites - 1:
        return num_sites - 1
    return min(num_sites - 1, 2 * math.ceil(neighbours / 2))


def default_threshold(site_degree: int) -> int:
    """A majority of a secret's holders (the site and its neighbours), at most the neighbours alone
    (so that a dropped site's key, whose own share is lost with it, can still be recovered)."""
    return max(1, min(site_degree, (site_degree + 1) // 2 + 1))


def check_settings(num_sites: int, threshold: int | None = None, neighbours: int | None = None) -> tuple[int, int]:
    """(neighbours per site, threshold) for rounds of ``num_sites`` sites, or a ``ConfigError`` naming
    the setting (``--secagg-threshold``, ``--secagg-neighbours``) that cannot work."""
    if isinstance(num_sites, bool) or not isinstance(num_sites, numbers.Integral) or num_sites < MIN_SITES:
        raise ConfigError(f"--secure-agg needs at least {MIN_SITES} sites per round, got {num_sites!r}")
    if neighbours is not None:
        if isinstance(neighbours, bool) or not isinstance(neighbours, numbers.Integral) or neighbours < 1:
            raise ConfigError(f"--secagg-neighbours {neighbours!r}: must be a whole number of at least 1")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral) or threshold < 1:
            raise ConfigError(f"--secagg-threshold {threshold!r}: must be a whole number of at least 1")
        if threshold > num_sites - 1:
            raise ConfigError(
                f"--secagg-threshold {threshold}: above the {num_sites - 1} other site(s) of a round of "
                f"{num_sites}; a dropped site's shares are held by the others, so its masks could "
                "never be removed"
            )
        if neighbours is not None and neighbours < threshold:
            raise ConfigError(
                f"--secagg-neighbours {neighbours}: below --secagg-threshold {threshold}; a site's "
                "shares go to its neighbours, too few to reach the threshold"
            )
    d = degree(int(num_sites), None if neighbours is None else int(neighbours))
    t = default_threshold(d) if threshold is None else int(threshold)
    if t > d:
        raise ConfigError(f"--secagg-threshold {t}: above the {d} neighbours per site (--secagg-neighbours)")
    return d, t


def neighbour_graph(sites: Collection[str], neighbours: int | None, instance: str) -> dict[str, tuple[str, ...]]:
    """Each site's neighbours: all the others, or a ring lattice of ``degree`` in an order drawn from
    ``instance`` (public: every site computes the same graph from the roster)."""
    order = sorted(sites, key=lambda s: hashlib.sha256(f"{PROTOCOL}|graph|{instance}|{s}".encode()).digest())
    n = len(order)
    d = degree(n, neighbours)
    if d >= n - 1:
        return {s: tuple(sorted(x for x in order if x != s)) for s in order}
    half = d // 2
    graph: dict[str, set[str]] = {s: set() for s in order}
    for i, s in enumerate(order):
        for j in range(1, half + 1):
            other = order[(i + j) % n]
            graph[s].add(other)
            graph[other].add(s)
    return {s: tuple(sorted(v)) for s, v in sorted(graph.items())}


def instance_id(session: str, purpose: str, round: int, attempt: int) -> str:
    """The name of one run of the protocol; every key and mask is derived under it."""
    return json.dumps([str(session), str(purpose), int(round), int(attempt)], separators=(",", ":"))


# -------------------------------------------------------------------------------- fixed point


def max_abs_value(num_sites: int, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> float:
    """Largest |value| a site may mask when ``num_sites`` sites are summed: ``2**(62 - f) / n``."""
    n = _check_int("num_sites", num_sites, 1)
    return 2.0 ** (62 - _check_bits(fractional_bits)) / n


def encode_fixed(values: np.ndarray, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> np.ndarray:
    """Floats -> uint64: ``round(x * 2**f)`` as a two's complement 64-bit integer (no range check)."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * 2.0**fractional_bits)
    return scaled.astype(np.int64).view(np.uint64)


def decode_fixed(values: np.ndarray, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> np.ndarray:
    """uint64 (a fixed-point value or sum, modulo 2**64) -> float64, read as signed."""
    return np.asarray(values, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**fractional_bits


# ------------------------------------------------------------------------------------ crypto


def _hkdf(key: bytes, *info) -> bytes:
    text = json.dumps([PROTOCOL, *info], separators=(",", ":"))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=text.encode()).derive(key)


def prg(key: bytes, length: int) -> np.ndarray:
    """``length`` uint64 from the ChaCha20 keystream of a 32-byte key used once (so a fixed nonce)."""
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * int(length)))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def _public(key: bytes, whose: str) -> X25519PublicKey:
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        got = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise DataError(f"secure aggregation: site {whose!r}: a public key is 32 raw bytes, got {got}")
    return X25519PublicKey.from_public_bytes(bytes(key))


def _agree(private: X25519PrivateKey, public: bytes, whose: str) -> bytes:
    try:
        return private.exchange(_public(public, whose))
    except ValueError:
        raise DataError(f"secure aggregation: site {whose!r}: public key is not a usable X25519 key") from None


def pair_mask_key(private: X25519PrivateKey, peer_public: bytes, instance: str, a: str, b: str) -> bytes:
    """The pairwise mask key of sites ``a`` and ``b`` in ``instance`` (either side derives it)."""
    return _hkdf(_agree(private, peer_public, b if a < b else a), "pair", instance, sorted([a, b]))


def self_mask(seed: bytes, instance: str, length: int) -> np.ndarray:
    return prg(_hkdf(seed, "self", instance), length)


@dataclass(frozen=True)
class MaskedUpdate:
    """One site's masked, fixed-point vector for one instance; meaningless alone, summed by the server."""

    site_id: str
    instance: str
    round: int
    attempt: int
    fractional_bits: int
    values: np.ndarray  # (size,) uint64

    @property
    def num_bytes(self) -> int:
        return int(self.values.nbytes)


@dataclass(frozen=True)
class Advertisement:
    """A site's two public keys for an instance: ``c`` to encrypt shares to it, ``s`` for pairwise masks."""

    site_id: str
    instance: str
    c_public: bytes
    s_public: bytes


@dataclass(frozen=True)
class SiteRoster:
    """What one site is sent of an instance's roster: the advertisements of the site and of its
    neighbours, the only keys it uses, and the ids of the other sites that advertised, so that it can
    compute the neighbour graph (from every site's id and the instance)."""

    advertisements: tuple[Advertisement, ...]
    other_sites: tuple[str, ...]

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site of the instance, sorted."""
        return tuple(sorted([a.site_id for a in self.advertisements] + list(self.other_sites)))


# -------------------------------------------------------------------------------------- a site


class SecAggClient:
    """One site's side of one protocol instance, everything derived from its 32-byte ``master`` secret.

    The object holds no state but the derived keys: it can be rebuilt from (master, instance) in any
    process of the site. What it must remember between calls (that it masked, that it answered an
    unmask request) the caller keeps, in ``spent``.
    """

    def __init__(self, site_id: str, master: bytes, instance: str, fractional_bits: int = DEFAULT_FRACTIONAL_BITS):
        self.site_id = _check_site_id(site_id)
        if not isinstance(master, (bytes, bytearray)) or len(master) != 32:
            raise ConfigError(f"secure aggregation: site {site_id!r}: a master secret is 32 bytes")
        self.instance = str(instance)
        self.fractional_bits = _check_bits(fractional_bits)
        self._c = X25519PrivateKey.from_private_bytes(_hkdf(bytes(master), "c", self.instance, self.site_id))
        self._s_raw = _hkdf(bytes(master), "s", self.instance, self.site_id)
        self._s = X25519PrivateKey.from_private_bytes(self._s_raw)
        self._b = _hkdf(bytes(master), "b", self.instance, self.site_id)
        self._coins_key = _hkdf(bytes(master), "coins", self.instance, self.site_id)

    def advertise(self) -> Advertisement:
        return Advertisement(
            self.site_id,
            self.instance,
            self._c.public_key().public_bytes_raw(),
            self._s.public_key().public_bytes_raw(),
        )

    def _channel(self, peer: str, peer_c_public: bytes, sender: str, recipient: str) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(_hkdf(_agree(self._c, peer_c_public, peer), "enc", self.instance, sender, recipient))

    def _roster(
        self, roster: SiteRoster | Mapping[str, Advertisement], neighbours: int | None
    ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, Advertisement]]:
        """(every site, this site's neighbours, their advertisements and its own) from ``roster``: a
        ``SiteRoster``, or every site's advertisement by id. Refuses a roster without this site's own keys
        or without the advertisement of one of its neighbours; those of other sites are not used."""
        if isinstance(roster, SiteRoster):
            for adv in roster.advertisements:
                if not isinstance(adv, Advertisement):
                    raise DataError(
                        f"secure aggregation: site {self.site_id!r}: the roster holds a {type(adv).__name__} "
                        "where an advertisement belongs"
                    )
            entries = [(a.site_id, a) for a in roster.advertisements]
            sites = (*(sid for sid, _ in entries), *roster.other_sites)
        elif isinstance(roster, Mapping):
            entries = list(roster.items())
            sites = tuple(roster)
        else:
            raise DataError(
                f"secure aggregation: site {self.site_id!r}: the roster is a {type(roster).__name__}, not a SiteRoster"
            )
        for sid in sites:
            _check_site_id(sid)
        if len(set(sites)) != len(sites):
            repeated = sorted({s for s in sites if sites.count(s) > 1})
            raise DataError(
                f"secure aggregation: site {self.site_id!r}: the roster lists site(s) {', '.join(repeated)} "
                "more than once"
            )
        given = dict(entries)
        for sid, adv in entries:
            if not isinstance(adv, Advertisement) or adv.site_id != sid or adv.instance != self.instance:
                raise DataError(
                    f"secure aggregation: site {self.site_id!r}: roster entry for {sid!r} is not an "
                    f"advertisement of this instance"
                )
        if self.site_id not in sites or given.get(self.site_id) != self.advertise():
            raise DataError(f"secure aggregation: site {self.site_id!r} is not in the roster with its own keys")
        if len(sites) < MIN_SITES:
            raise ConfigError(
                f"secure aggregation: site {self.site_id!r} has no peers: with fewer than {MIN_SITES} "
                "sites the value would be sent in the clear"
            )
        mine = neighbour_graph(sites, neighbours, self.instance)[self.site_id]
        missing = [v for v in mine if v not in given]
        if missing:
            raise DataError(
                f"secure aggregation: site {self.site_id!r}: the roster has no advertisement of its "
                f"neighbour(s) {', '.join(missing)}"
            )
        return sites, mine, {v: given[v] for v in (self.site_id, *mine)}

    def _shares(self, mine: Collection[str], threshold: int):
        """(holders, b shares, s-key shares) for this site and its neighbours ``mine``: the same every
        time (the coins derive from the master)."""
        holders = tuple(sorted([*mine, self.site_id]))
        t = _check_int("threshold", threshold, 1)
        if t > len(holders) - 1:
            raise ConfigError(
                f"secure aggregation: threshold {t} is above the {len(holders) - 1} neighbours of site {self.site_id!r}"
            )
        coins = random.Random(_hkdf(self._coins_key, "split"))
        return (
            holders,
            split(self._b, t, len(holders), rng=coins.getrandbits),
            split(self._s_raw, t, len(holders), rng=coins.getrandbits),
        )

    def share_keys(
        self, roster: SiteRoster | Mapping[str, Advertisement], threshold: int, neighbours: int | None
    ) -> dict[str, bytes]:
        """{neighbour: ciphertext of its shares of this site's b and s key}; the server relays them. The
        site keeps a share of each for itself (recomputed when it is needed)."""
        _, mine, keys = self._roster(roster, neighbours)
        holders, b_shares, s_shares = self._shares(mine, threshold)
        out = {}
        for peer, bs, ss in zip(holders, b_shares, s_shares):
            if peer == self.site_id:
                continue
            plain = json.dumps([self.site_id, peer, bs.to_bytes().hex(), ss.to_bytes().hex()]).encode()
            aad = f"{self.instance}|{self.site_id}|{peer}".encode()
            out[peer] = self._channel(peer, keys[peer].c_public, self.site_id, peer).encrypt(bytes(12), plain, aad)
        return out

    def mask(
        self,
        vector: Tensor | np.ndarray,
        roster: SiteRoster | Mapping[str, Advertisement],
        shared: Collection[str],
        neighbours: int | None,
        round: int,
        attempt: int,
    ) -> MaskedUpdate:
        """This site's vector in fixed point plus its self-mask and its pairwise masks with the neighbours
        in ``shared`` (the sites whose shares the server relayed: U2)."""
        sites, mine, keys = self._roster(roster, neighbours)
        if self.site_id not in shared:
            raise DataError(
                f"secure aggregation: site {self.site_id!r} is asked to mask but is not among the sites "
                "that shared their keys"
            )
        if isinstance(vector, Tensor):
            vector = vector.detach().cpu().double().numpy()
        values = np.asarray(vector, dtype=np.float64)
        if values.ndim != 1:
            raise DataError(
                f"secure aggregation: site {self.site_id!r}: expected a 1-D vector, got shape {list(values.shape)}"
            )
        if not np.isfinite(values).all():
            raise DataError(f"secure aggregation: site {self.site_id!r}: vector contains NaN or infinite values")
        bound = max_abs_value(len(sites), self.fractional_bits)
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > bound:
            raise DataError(
                f"secure aggregation: site {self.site_id!r}: a value of magnitude {peak:.4g} is beyond the "
                f"fixed-point range +-{bound:.4g} for {len(sites)} sites at 2^{self.fractional_bits}; "
                "clip the update"
            )
        masked = encode_fixed(values, self.fractional_bits) + self_mask(self._b, self.instance, values.size)
        for peer in mine:
            if peer not in shared:
                continue
            m = prg(pair_mask_key(self._s, keys[peer].s_public, self.instance, self.site_id, peer), values.size)
            masked = masked + m if peer > self.site_id else masked - m  # uint64 arithmetic wraps modulo 2**64
        return MaskedUpdate(
            self.site_id,
            self.instance,
            _check_int("round", round),
            _check_int("attempt", attempt),
            self.fractional_bits,
            masked,
        )

    def unmask(
        self,
        roster: SiteRoster | Mapping[str, Advertisement],
        survivors: Collection[str],
        dropped: Collection[str],
        ciphertexts: Mapping[str, bytes],
        threshold: int,
        neighbours: int | None = None,
    ) -> dict[str, tuple[str, bytes]]:
        """For each site whose shares this site holds (itself included): (``"self"``, its b share) if it
        survived, (``"pair"``, its s-key share) if it dropped. Refuses a peer that is both, and too few
        survivors."""
        _, mine, keys = self._roster(roster, neighbours)
        survivors, dropped = set(survivors), set(dropped)
        both = sorted(survivors & dropped)
        if both:
            raise DataError(
                f"secure aggregation: site {self.site_id!r} refuses to unmask: site(s) {', '.join(both)} "
                "listed both as survivor and as dropped (that would reveal both of their secrets)"
            )
        if self.site_id not in survivors:
            raise DataError(f"secure aggregation: site {self.site_id!r} is asked to unmask but is not a survivor")
        if len(survivors) < max(MIN_SITES, int(threshold)):
            raise DataError(
                f"secure aggregation: site {self.site_id!r} refuses to unmask for {len(survivors)} "
                f"survivor(s), fewer than {max(MIN_SITES, int(threshold))}"
            )
        out = {}
        for sender, ct in sorted(ciphertexts.items()):
            if sender not in survivors and sender not in dropped:
                continue
            if sender not in mine:
                raise DataError(
                    f"secure aggregation: site {self.site_id!r}: shares from {sender!r}, who is not its "
                    "neighbour in the roster"
                )
            aad = f"{self.instance}|{sender}|{self.site_id}".encode()
            try:
                plain = self._channel(sender, keys[sender].c_public, sender, self.site_id).decrypt(bytes(12), ct, aad)
            except InvalidTag:
                raise DataError(
                    f"secure aggregation: site {self.site_id!r}: the shares from {sender!r} do not "
                    "decrypt (tampered or misrouted)"
                ) from None
            frm, to, b_hex, s_hex = json.loads(plain)
            if (frm, to) != (sender, self.site_id):
                raise DataError(f"secure aggregation: shares from {sender!r} are addressed {frm!r} -> {to!r}")
            out[sender] = (SELF, bytes.fromhex(b_hex)) if sender in survivors else (PAIR, bytes.fromhex(s_hex))
        holders, b_shares, _ = self._shares(mine, threshold)
        out[self.site_id] = (SELF, b_shares[holders.index(self.site_id)].to_bytes())
        return out


# ------------------------------------------------------------------------------------ the server


@dataclass
class SecAggServer:
    """The server's side of one instance: sends each site its view of the roster, routes the shares, then
    removes the masks from the sum."""

    instance: str
    roster: dict[str, Advertisement]
    threshold: int
    neighbours: int | None = None
    ciphertexts: dict[str, dict[str, bytes]] = field(default_factory=dict)  # recipient -> sender -> ciphertext

    def __post_init__(self) -> None:
        self.roster = dict(sorted(self.roster.items()))
        for sid, adv in self.roster.items():
            if not isinstance(adv, Advertisement) or adv.site_id != sid or adv.instance != self.instance:
                raise DataError(f"secure aggregation: advertisement of {sid!r} is not one of instance {self.instance}")
        self.sites = tuple(self.roster)
        self.graph = neighbour_graph(self.sites, self.neighbours, self.instance)
        self.shared: list[str] = []

    def roster_for(self, site: str) -> SiteRoster:
        """What ``site`` is sent of the roster: every site's id, and the advertisements of itself and its
        neighbours (with the full graph, everyone's)."""
        if site not in self.roster:
            raise DataError(f"secure aggregation: site {site!r} did not advertise keys for instance {self.instance}")
        holders = {site, *self.graph[site]}
        return SiteRoster(
            tuple(self.roster[s] for s in sorted(holders)), tuple(s for s in self.sites if s not in holders)
        )

    def route(self, shares: Mapping[str, Mapping[str, bytes]]) -> None:
        """Take each sender's {recipient: ciphertext}; the senders are the sites that shared (U2)."""
        self.shared = sorted(shares)
        self.ciphertexts = {}
        for sender, by_recipient in shares.items():
            expected = set(self.graph[sender])
            if set(by_recipient) != expected:
                raise DataError(
                    f"secure aggregation: site {sender!r} sent shares to {sorted(by_recipient)}, its "
                    f"neighbours are {sorted(expected)}"
                )
            for recipient, ct in by_recipient.items():
                self.ciphertexts.setdefault(recipient, {})[sender] = ct

    def inbox(self, site: str) -> dict[str, bytes]:
        """The ciphertexts addressed to ``site`` from the sites that shared."""
        return {s: ct for s, ct in self.ciphertexts.get(site, {}).items() if s in self.shared}

    def finish(
        self, masked: Mapping[str, MaskedUpdate], revealed: Mapping[str, Mapping[str, tuple[str, bytes]]]
    ) -> Tensor:
        """The float64 sum of the survivors' vectors, from their masked inputs (``masked``: the survivors,
        U3) and the survivors' answers to the unmask request (``revealed``: responder -> peer -> share).

        Refuses (``DataError``) when some site's secret has fewer than ``threshold`` shares, or inputs
        that are not of this instance or of one length.
        """
        survivors = sorted(masked)
        dropped = sorted(set(self.shared) - set(survivors))
        if len(survivors) < MIN_SITES:
            raise DataError(
                f"secure aggregation: {len(survivors)} survivor(s): a sum over fewer than {MIN_SITES} "
                "sites is not released"
            )
        if set(survivors) - set(self.shared):
            raise DataError(
                f"secure aggregation: masked input from site(s) "
                f"{', '.join(sorted(set(survivors) - set(self.shared)))} that did not share keys"
            )
        first = masked[survivors[0]]
        for sid, u in masked.items():
            if not isinstance(u, MaskedUpdate) or u.site_id != sid or u.instance != self.instance:
                raise DataError(
                    f"secure aggregation: the masked input of {sid!r} is not one of instance {self.instance}"
                )
            if (
                u.values.dtype != np.uint64
                or u.values.shape != first.values.shape
                or u.fractional_bits != first.fractional_bits
            ):
                raise DataError(
                    f"secure aggregation: site {sid!r} sent {u.values.dtype} values of shape "
                    f"{list(u.values.shape)} at 2^{u.fractional_bits}, expected those of {first.site_id!r}"
                )
        shares: dict[tuple[str, str], list[Share]] = {}
        for responder, answers in revealed.items():
            if responder not in survivors:
                continue
            for peer, (kind, data) in answers.items():
                if responder not in self.graph.get(peer, ()) and responder != peer:
                    continue
                want = SELF if peer in survivors else PAIR if peer in dropped else None
                if kind != want:
                    raise DataError(
                        f"secure aggregation: site {responder!r} revealed a {kind!r} share of {peer!r}, "
                        f"expected {want!r}"
                    )
                shares.setdefault((kind, peer), []).append(Share.from_bytes(data))
        short = [
            p
            for p in survivors + dropped
            if len(shares.get((SELF if p in survivors else PAIR, p), [])) < self.threshold
        ]
        if short:
            raise DataError(
                f"secure aggregation: fewer than {self.threshold} shares for site(s) {', '.join(short)}: "
                "their masks cannot be removed"
            )
        size = first.values.size
        total = np.zeros(size, dtype=np.uint64)
        for u in masked.values():
            total += u.values
        for p in survivors:
            total -= self_mask(combine(shares[SELF, p], self.threshold), self.instance, size)
        for p in dropped:
            s_key = X25519PrivateKey.from_private_bytes(combine(shares[PAIR, p], self.threshold))
            if s_key.public_key().public_bytes_raw() != self.roster[p].s_public:
                raise DataError(f"secure aggregation: the shares of {p!r}'s key do not match its public key")
            for v in self.graph[p]:
                if v not in survivors:
                    continue
                m = prg(pair_mask_key(s_key, self.roster[v].s_public, self.instance, p, v), size)
                total = total - m if p > v else total + m  # v added +m when p sorts after it
        return torch.from_numpy(decode_fixed(total, first.fractional_bits))


def secure_sum(
    vectors: Mapping[str, np.ndarray | Tensor],
    masters: Mapping[str, bytes],
    instance: str,
    threshold: int,
    neighbours: int | None = None,
    drop_after_sharing: Iterable[str] = (),
    round: int = 0,
    attempt: int = 0,
) -> Tensor:
    """The whole protocol in one process (tests, simulations): the sum over the sites that did not drop."""
    clients = {s: SecAggClient(s, masters[s], instance) for s in vectors}
    server = SecAggServer(instance, {s: c.advertise() for s, c in clients.items()}, threshold, neighbours)
    server.route({s: c.share_keys(server.roster_for(s), threshold, neighbours) for s, c in clients.items()})
    drop = set(drop_after_sharing)
    masked = {
        s: c.mask(vectors[s], server.roster_for(s), server.shared, neighbours, round, attempt)
        for s, c in clients.items()
        if s not in drop
    }
    revealed = {
        s: clients[s].unmask(server.roster_for(s), list(masked), sorted(drop), server.inbox(s), threshold, neighbours)
        for s in masked
    }
    return server.finish(masked, revealed)
