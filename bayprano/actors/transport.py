"""How the Coordinator talks to its sites: Ray calls with deadlines and retries, the byte ledger, and
secure-aggregation instances.

``SiteTransport.gather`` sends one call to each of a set of sites and collects what arrives within a
timeout: a ``Gathered`` of the replies, the sites that were late or failed, and the errors of those that
failed. Each call's arguments count as bytes down, each reply as bytes up (``wire_bytes``: its size
serialised for the wire) in the ``CommunicationLedger``, per (round, site, direction); every reply goes
to ``transcript`` with its stage, and every update, validation and calibration reply to ``received``. A reply still
pending at the deadline is abandoned, never read (``abandoned`` keeps the last few).

``SiteTransport.secure_sum`` runs one sum as an instance of the double-masking protocol
(``platform.federated.secagg``): advertise keys, share them, masked inputs, unmask; at each step after
the first a site is sent the ids of the instance's sites and the keys of its neighbours only
(``share_calls``, ``mask_context``, ``unmask_calls``), so its download grows with its neighbours. A site
that is late or dead after sharing its keys is dropped and its pairwise masks removed from the
survivors' sum: no redo. Only when the survivors cannot remove the masks is the sum retried, as a new
instance with fresh keys, masks and local episodes, while every reply still pending from the old one is
abandoned unread.

With ``private`` (under DP) the logs name no site: who took part is part of the secret.
"""

from __future__ import annotations

import functools
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import ray
import torch

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.federated.messages import MaskedReply, SecAggContext, SharesReply
from bayprano.platform.federated.secagg import Advertisement, MaskedUpdate, SecAggServer, check_settings, instance_id
from bayprano.platform.federated.state import CommunicationLedger

MAX_ATTEMPTS = 3  # instances of one secure sum before the round gives up
KEPT_ABANDONED = 32


def wire_bytes(reply: Any) -> int:
    """The size of what a site sent: its reply as serialised for the wire (pickle protocol 5)."""
    return len(pickle.dumps(reply, protocol=5))


def share_calls(server: SecAggServer) -> dict[str, tuple[str, tuple]]:
    """The share-keys request to each site that advertised: its view of the roster (every site's id, its
    own and its neighbours' keys), the threshold, the neighbours setting."""
    return {
        s: ("secagg_share", (server.instance, server.roster_for(s), server.threshold, server.neighbours))
        for s in server.roster
    }


def mask_context(server: SecAggServer, site: str, round: int, attempt: int) -> SecAggContext:
    """What ``site`` is told of the instance with the request for its masked vector: its view of the
    roster and the sites that shared their keys."""
    return SecAggContext(
        instance=server.instance,
        roster=server.roster_for(site),
        shared=tuple(server.shared),
        neighbours=server.neighbours,
        round=round,
        attempt=attempt,
    )


def unmask_calls(server: SecAggServer, survivors: list[str]) -> dict[str, tuple[str, tuple]]:
    """The unmask request to each survivor: its view of the roster, the survivors, the sites of U2 that
    dropped, the ciphertexts addressed to it."""
    dropped = sorted(set(server.shared) - set(survivors))
    return {
        s: (
            "secagg_unmask",
            (
                server.instance,
                server.roster_for(s),
                survivors,
                dropped,
                server.inbox(s),
                server.threshold,
                server.neighbours,
            ),
        )
        for s in survivors
    }


@dataclass
class Gathered:
    """What one gather got: the replies by site, the sites late or failed (sorted), and the failures' errors."""

    replies: dict[str, Any]
    missing: list[str]
    errors: dict[str, BaseException] = field(default_factory=dict)


@dataclass(frozen=True)
class SecureSum:
    """A secure sum's outcome: the survivors' sum, the survivors, the attempt that gave it and their replies."""

    sum: torch.Tensor
    sites: list[str]
    attempt: int
    replies: dict[str, Any]


class SiteTransport:
    """Calls to the sites of ``factories`` ({site: Factory handle}), counted and recorded."""

    def __init__(self, factories: Mapping[str, Any], log: Callable[[str], None], private: bool = False):
        self.factories = dict(factories)
        self.log = log
        self.private = private
        self.ledger = CommunicationLedger()
        self.received: list[Any] = []  # every update, validation and calibration reply, as received
        self.transcript: list[dict] = []  # every reply with its stage, round, site and size on the wire
        self.abandoned: list[dict] = []  # replies still pending at a deadline: never read (the last few)

    def name(self, site: str) -> str:
        """A site as the logs name it: under DP, not at all."""
        return "(a sampled site)" if self.private else site

    def count_or_names(self, sites: list[str]) -> str:
        return f"{len(sites)} site(s)" if self.private else ", ".join(sites)

    def gather(
        self,
        stage: str,
        round: int,
        calls: Mapping[str, tuple[str, tuple]],
        timeout: float,
        retry: bool = False,
        after_submit: Callable[[], None] | None = None,
        attempt: int = 0,
        count: bool = True,
    ) -> Gathered:
        """Replies that arrived within ``timeout`` seconds, and the sites that were late or failed.

        ``calls`` maps each site to (method, args). Unless ``count`` (the end-of-run report of shard sizes
        is not federation traffic), bytes are counted under ``round``. With ``retry`` (for calls that can
        be repeated) a site whose actor is restarting is asked again until the deadline.
        """
        deadline = time.monotonic() + timeout

        def submit(site: str) -> Any:
            method, args = calls[site]
            if count:
                self.ledger.record(round, site, "down", wire_bytes(args))
            return getattr(self.factories[site], method).remote(*args)

        pending = {submit(site): site for site in calls}
        if after_submit is not None:
            after_submit()
        replies: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:  # the deadline passed: what is ready by now still counts, nothing more
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                if not ready:
                    break
            else:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in ready:
                site = pending.pop(ref)
                try:
                    replies[site] = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:
                    if retry and deadline - time.monotonic() > 0.5:
                        time.sleep(0.5)
                        pending[submit(site)] = site
                    else:
                        self.log(f"site {self.name(site)} is unavailable (restarting)")
                except ray.exceptions.RayError as exc:
                    errors[site] = getattr(exc, "cause", None) or exc
                    text = str(exc).strip()
                    self.log(
                        f"site {self.name(site)} failed: {type(exc).__name__} {text.splitlines()[-1] if text else ''}"
                    )
        for ref, site in pending.items():
            self.abandoned.append({"stage": stage, "round": round, "attempt": attempt, "site": site, "ref": ref})
        del self.abandoned[:-KEPT_ABANDONED]
        for site, reply in replies.items():
            size = wire_bytes(reply)
            if count:
                self.ledger.record(round, site, "up", size)
            self.transcript.append(
                {"stage": stage, "round": round, "attempt": attempt, "site": site, "reply": reply, "bytes": size}
            )
            if stage in ("update", "validation", "calibration", "rules"):
                self.received.append(reply)
        return Gathered(replies, sorted(set(calls) - set(replies)), errors)

    def secure_sum(
        self,
        purpose: str,
        round: int,
        sites: list[str],
        quorum: int,
        timeout: float,
        threshold_setting: int | None,
        neighbours: int | None,
        session: str,
        masked_call: Callable[[str, SecAggContext], tuple[str, tuple]],
        after_submit: Callable[[int, list[str]], None] | None = None,
        on_masked: Callable[[str, int, int, list[str]], None] | None = None,
    ) -> SecureSum | None:
        """One secure-aggregation instance over ``sites`` (retried as a new instance, fresh keys and masks,
        when the survivors cannot remove the masks), or None when fewer than ``quorum`` sites remain.

        ``masked_call(site, context)`` is the (method, args) that makes ``site`` send its masked vector;
        ``after_submit(attempt, sites)`` runs once those calls are sent, ``on_masked(purpose, round,
        attempt, survivors)`` once the masked inputs arrived.
        """
        for attempt in range(MAX_ATTEMPTS):
            if len(sites) < quorum:
                self.log(f"{purpose} {round}: {len(sites)} site(s) left, quorum is {quorum}")
                return None
            instance = instance_id(session, purpose, round, attempt)
            ads = self.gather(
                "advertise",
                round,
                {s: ("secagg_advertise", (instance,)) for s in sites},
                timeout,
                retry=True,
                attempt=attempt,
            ).replies
            roster = {
                s: a
                for s, a in ads.items()
                if isinstance(a, Advertisement) and a.site_id == s and a.instance == instance
            }
            if len(roster) < quorum:
                self.log(f"{purpose} {round}: {len(roster)} site(s) sent keys, quorum is {quorum}")
                return None
            try:
                _, threshold = check_settings(len(roster), threshold_setting, neighbours)
            except ConfigError as exc:
                self.log(f"{purpose} {round}: {len(roster)} site(s) sent keys: {exc}")
                return None
            server = SecAggServer(instance, roster, threshold, neighbours)
            shared = self.gather("share", round, share_calls(server), timeout, attempt=attempt).replies
            server.route({s: r.shares for s, r in shared.items() if isinstance(r, SharesReply)})
            hook = None if after_submit is None else functools.partial(after_submit, attempt, list(server.shared))
            got = self.gather(
                purpose,
                round,
                {s: masked_call(s, mask_context(server, s, round, attempt)) for s in server.shared},
                timeout,
                after_submit=hook,
                attempt=attempt,
            )
            masked = {
                s: r.masked
                for s, r in got.replies.items()
                if isinstance(r, MaskedReply) and isinstance(r.masked, MaskedUpdate) and r.masked.instance == instance
            }
            if got.missing:
                self.log(
                    f"{purpose} {round} attempt {attempt}: {self.count_or_names(got.missing)} dropped after "
                    "sharing their keys (late or dead); their pairwise masks are removed"
                )
            if on_masked is not None:
                on_masked(purpose, round, attempt, sorted(masked))
            survivors = sorted(masked)
            if len(survivors) < quorum:  # nothing is unmasked: the masked inputs stay meaningless
                self.log(f"{purpose} {round}: {len(survivors)} site(s) answered, quorum is {quorum}")
                return None
            revealed = self.gather("unmask", round, unmask_calls(server, survivors), timeout, attempt=attempt).replies
            try:
                total = server.finish(masked, {s: r.shares for s, r in revealed.items() if isinstance(r, SharesReply)})
            except DataError as exc:
                self.log(f"{purpose} {round} attempt {attempt}: {exc}; retrying as a new instance")
                sites = sorted(revealed)
                continue
            return SecureSum(total, survivors, attempt, got.replies)
        self.log(f"{purpose} {round}: no attempt of {MAX_ATTEMPTS} could remove the masks")
        return None
