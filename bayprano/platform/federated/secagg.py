"""Secure aggregation with pairwise additive masks, so that the server only ever learns the sum.

A simplified Bonawitz et al. (CCS 2017) protocol for an honest-but-curious server that relays public
keys faithfully, without its dropout recovery:

1. Every site holds an X25519 key pair (``SecAggSite``) and publishes ``public_key_bytes()``.
2. For a round, the server names the participating sites and hands each the others' public keys.
3. For every pair (i, j), both sites derive the same secret: X25519 key agreement, then HKDF-SHA256
   with ``info`` naming the protocol, the round, the attempt and both site ids, giving a 32-byte key
   for a ChaCha20 keystream (a cryptographic PRG; numpy's PCG64 or Philox are not) read as uint64.
4. Site i encodes its update in fixed point (``round(x * 2**fractional_bits)`` as a 64-bit two's
   complement integer), adds the pair masks for every j > i (site ids in string order), subtracts
   those for j < i, all modulo 2**64, and sends the result (``MaskedUpdate``).
5. The server adds the masked vectors modulo 2**64 (``aggregate``): every mask appears once with + and
   once with -, so they cancel and the fixed-point sum remains, which is decoded to floats.

Fixed-point range and overflow. With ``f = fractional_bits`` (default 24) each value is rounded to a
multiple of 2**-f (error <= 2**-(f+1) per site and coordinate, so <= n * 2**-(f+1) on a sum over n
sites: 3e-7 for n = 10). The sum is decoded as a signed 64-bit integer, which is exact as long as
every coordinate of the true sum lies in [-2**63, 2**63) after scaling. ``mask`` therefore refuses any
value with ``|x| > max_abs_value(n, f) = 2**(62 - f) / n`` (2**38 / n, about 2.7e11 / n, for f = 24):
then ``|sum| * 2**f <= 2**62``, with room for rounding. A delta clipped to L2 norm ``C`` (DP-FedAvg's
clipping) has every coordinate within ``C``, so ``C <= 2**(62 - f) / n`` rules overflow out: for
f = 24 and 1000 sites, any C up to 2.7e8.

What it does not do: a site that masked and then dropped leaves masks that do not cancel. ``aggregate``
refuses such a set (``DataError``) instead of returning a wrong sum; the caller redoes the round
without that site under the next ``attempt`` number, which gives fresh masks. Each site masks at most
once per (round, attempt): masking two different updates with the same masks would let the server
subtract them. Secret-sharing the mask seeds for dropout recovery, the self-masks and the protection
against a server that lies about keys or participants are out of scope.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import Tensor

from bayprano.platform.errors import ConfigError, DataError

PROTOCOL = "bayprano-secagg/v1"
DEFAULT_FRACTIONAL_BITS = 24
MIN_SITES = 2


def _check_bits(fractional_bits: int) -> int:
    if isinstance(fractional_bits, bool) or not isinstance(fractional_bits, numbers.Integral) \
            or not 0 <= fractional_bits <= 52:
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


def max_abs_value(num_sites: int, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> float:
    """Largest |value| a site may mask when ``num_sites`` sites are summed: ``2**(62 - f) / n``."""
    n = _check_int("num_sites", num_sites, 1)
    return 2.0 ** (62 - _check_bits(fractional_bits)) / n


def encode_fixed(values: np.ndarray, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> np.ndarray:
    """Floats -> uint64: ``round(x * 2**f)`` as a two's complement 64-bit integer (no range check)."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * 2.0 ** fractional_bits)
    return scaled.astype(np.int64).view(np.uint64)


def decode_fixed(values: np.ndarray, fractional_bits: int = DEFAULT_FRACTIONAL_BITS) -> np.ndarray:
    """uint64 (a fixed-point value or sum, modulo 2**64) -> float64, read as signed."""
    return np.asarray(values, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0 ** fractional_bits


@dataclass(frozen=True)
class MaskedUpdate:
    """One site's masked, fixed-point update for one round; meaningless alone, summed by ``aggregate``."""

    site_id: str
    round: int
    attempt: int
    participants: tuple[str, ...]  # every site masked against, itself included, sorted
    fractional_bits: int
    values: np.ndarray  # (size,) uint64

    @property
    def num_bytes(self) -> int:
        return int(self.values.nbytes)


class SecAggSite:
    """One site's side of secure aggregation: its X25519 key pair and the masking of its updates.

    ``private_key`` may be an ``X25519PrivateKey`` or its 32 raw bytes; by default a fresh key is
    generated. It cannot be pickled (its private key never leaves the process): create it inside the
    site's process; a restarted site makes a new one and publishes its new public key.
    """

    def __init__(
        self,
        site_id: str,
        private_key: X25519PrivateKey | bytes | None = None,
        fractional_bits: int = DEFAULT_FRACTIONAL_BITS,
    ):
        self.site_id = _check_site_id(site_id)
        self.fractional_bits = _check_bits(fractional_bits)
        if private_key is None:
            private_key = X25519PrivateKey.generate()
        elif isinstance(private_key, (bytes, bytearray)):
            if len(private_key) != 32:
                raise ConfigError(f"secure aggregation: site {site_id!r}: a private key is 32 bytes, got {len(private_key)}")
            private_key = X25519PrivateKey.from_private_bytes(bytes(private_key))
        elif not isinstance(private_key, X25519PrivateKey):
            raise ConfigError(f"secure aggregation: site {site_id!r}: private_key must be an X25519 key or 32 bytes, "
                              f"got {type(private_key).__name__}")
        self._key = private_key
        self._used: set[tuple[int, int]] = set()

    def public_key_bytes(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def _pair_key(self, peer_id: str, peer_public_key: bytes, round: int, attempt: int) -> bytes:
        if not isinstance(peer_public_key, (bytes, bytearray)) or len(peer_public_key) != 32:
            got = f"{len(peer_public_key)} bytes" if isinstance(peer_public_key, (bytes, bytearray)) \
                else type(peer_public_key).__name__
            raise DataError(f"secure aggregation: site {peer_id!r}: a public key is 32 raw bytes, got {got}")
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public_key)))
        except ValueError:
            raise DataError(f"secure aggregation: site {peer_id!r}: public key is not a usable X25519 key") from None
        info = json.dumps([PROTOCOL, round, attempt, sorted([self.site_id, peer_id])], separators=(",", ":"))
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(shared)

    def pair_mask(self, peer_id: str, peer_public_key: bytes, round: int, length: int, attempt: int = 0) -> np.ndarray:
        """The uint64 mask this site shares with ``peer_id`` for (round, attempt); both derive the same."""
        peer_id = _check_site_id(peer_id)
        if peer_id == self.site_id:
            raise ConfigError(f"secure aggregation: site {peer_id!r} has no mask with itself")
        round, attempt = _check_int("round", round), _check_int("attempt", attempt)
        length = _check_int("length", length)
        key = self._pair_key(peer_id, peer_public_key, round, attempt)
        # the key is used once (one pair, round and attempt), so a fixed nonce is safe
        stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * length))
        return np.frombuffer(stream, dtype="<u8").astype(np.uint64)

    def mask(
        self,
        update_vector: Tensor | np.ndarray,
        round: int,
        peers: Mapping[str, bytes],
        attempt: int = 0,
    ) -> MaskedUpdate:
        """This site's update, fixed-point encoded and masked for the sites in ``peers`` (id -> public
        key; this site itself may be listed with its own key). At least two sites in all."""
        round, attempt = _check_int("round", round), _check_int("attempt", attempt)
        if not isinstance(peers, Mapping):
            raise ConfigError(f"secure aggregation: peers must map site ids to public keys, got {type(peers).__name__}")
        others = {}
        for pid, key in peers.items():
            pid = _check_site_id(pid)
            if pid == self.site_id:
                if key != self.public_key_bytes():
                    raise DataError(f"secure aggregation: site {pid!r} is listed among its peers with another public key")
                continue
            others[pid] = key
        participants = tuple(sorted([self.site_id, *others]))
        if len(participants) < MIN_SITES:
            raise ConfigError(f"secure aggregation: site {self.site_id!r} has no peers in round {round}: "
                              f"with fewer than {MIN_SITES} sites the update would be sent in the clear")
        if isinstance(update_vector, Tensor):
            update_vector = update_vector.detach().cpu().double().numpy()
        values = np.asarray(update_vector, dtype=np.float64)
        if values.ndim != 1:
            raise DataError(f"secure aggregation: site {self.site_id!r}: expected a 1-D update, got shape {list(values.shape)}")
        if not np.isfinite(values).all():
            raise DataError(f"secure aggregation: site {self.site_id!r}: update contains NaN or infinite values")
        bound = max_abs_value(len(participants), self.fractional_bits)
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > bound:
            raise DataError(f"secure aggregation: site {self.site_id!r}: a value of magnitude {peak:.4g} is beyond the "
                            f"fixed-point range +-{bound:.4g} for {len(participants)} sites at 2^{self.fractional_bits}; "
                            "clip the update")
        if (round, attempt) in self._used:
            raise DataError(f"secure aggregation: site {self.site_id!r} already masked an update for round {round} "
                            f"attempt {attempt}; a retry must use the next attempt number")
        masked = encode_fixed(values, self.fractional_bits)
        for pid, key in others.items():
            m = self.pair_mask(pid, key, round, values.size, attempt)
            masked = masked + m if pid > self.site_id else masked - m  # uint64 arithmetic wraps modulo 2**64
        self._used.add((round, attempt))
        return MaskedUpdate(self.site_id, round, attempt, participants, self.fractional_bits, masked)


def aggregate(
    masked_updates: Iterable[MaskedUpdate],
    expected_sites: Collection[str],
    round: int | None = None,
    attempt: int | None = None,
) -> Tensor:
    """The float32 sum of the sites' updates, from their masked updates.

    Refuses (``DataError``) anything whose masks would not cancel: a site of ``expected_sites``
    missing (it masked, then dropped: redo the round without it, next attempt), an unexpected or
    duplicated site, updates from different rounds or attempts (or not from ``round`` / ``attempt``
    when given), masked against another set of sites, or of different lengths or precisions.
    """
    expected = [_check_site_id(s) for s in expected_sites]
    if len(set(expected)) != len(expected):
        raise ConfigError(f"secure aggregation: expected_sites lists a site twice: {sorted(expected)}")
    if len(expected) < MIN_SITES:
        raise ConfigError(f"secure aggregation: needs at least {MIN_SITES} expected sites, got {sorted(expected)}")
    updates: list[MaskedUpdate] = list(masked_updates)
    for u in updates:
        if not isinstance(u, MaskedUpdate):
            raise DataError(f"secure aggregation: expected MaskedUpdate objects, got {type(u).__name__}")
    got = [u.site_id for u in updates]
    dup = sorted({s for s in got if got.count(s) > 1})
    if dup:
        raise DataError(f"secure aggregation: more than one update from site(s) {', '.join(dup)}")
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        raise DataError(f"secure aggregation: no update from site(s) {', '.join(missing)}: their masks do not cancel "
                        "and the sum would be garbage; redo the round without them (next attempt)")
    if extra:
        raise DataError(f"secure aggregation: update(s) from unexpected site(s) {', '.join(extra)}")
    want_round = updates[0].round if round is None else _check_int("round", round)
    want_attempt = updates[0].attempt if attempt is None else _check_int("attempt", attempt)
    participants = tuple(sorted(expected))
    first = updates[0]
    for u in updates:
        if u.round != want_round or u.attempt != want_attempt:
            raise DataError(f"secure aggregation: site {u.site_id!r} sent round {u.round} attempt {u.attempt}, "
                            f"expected round {want_round} attempt {want_attempt}")
        if u.participants != participants:
            raise DataError(f"secure aggregation: site {u.site_id!r} masked for sites {list(u.participants)}, "
                            f"expected {list(participants)}")
        if u.fractional_bits != first.fractional_bits:
            raise DataError(f"secure aggregation: site {u.site_id!r} used 2^{u.fractional_bits} fixed point, "
                            f"site {first.site_id!r} 2^{first.fractional_bits}")
        if not isinstance(u.values, np.ndarray) or u.values.dtype != np.uint64 or u.values.shape != first.values.shape \
                or u.values.ndim != 1:
            raise DataError(f"secure aggregation: site {u.site_id!r} sent {getattr(u.values, 'dtype', '?')} values of "
                            f"shape {list(getattr(u.values, 'shape', []))}, expected uint64 of shape {list(first.values.shape)}")
    total = np.zeros(first.values.shape, dtype=np.uint64)
    for u in updates:
        total += u.values  # modulo 2**64
    return torch.from_numpy(decode_fixed(total, first.fractional_bits).astype(np.float32))

