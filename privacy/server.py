"""The cloud's side of one secure-aggregation round: route, sum, and unmask the sum only.

One :class:`MaskingServer` per round, its four methods matching the sites' four steps; each
takes the replies that arrived (a site missing from a list has dropped at that step) and returns
what goes out next::

    server = MaskingServer(config, round_idx)
    roster = server.collect_keys(adverts)          # -> every site that advertised (U1)
    deliveries = server.route_shares(bundles)      # -> deliveries[site] to each site of U2
    request = server.collect_masked(inputs)        # -> every site of U3 (inputs arrived)
    result = server.unmask(responses)              # result.total: the sum over U3

The cloud is trusted to follow these steps (honest-but-curious): it sees public keys, sealed
shares it cannot open, masked vectors that are each uniformly random, and, in step 4, ``t`` or
more shares of the self-mask seed of each survivor and of the mask key of each site that shared
keys but sent no input (U2 minus U3). From those it removes exactly the masks that do not
cancel, and learns the sum of the survivors' updates and nothing else about any one of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privacy.config import SecAggConfig
from privacy.errors import ProtocolError, SecAggAbort
from privacy.graph import neighbour_graph
from privacy.keys import KEY_BYTES, load_private, pair_mask_key, public_bytes, self_mask_key
from privacy.messages import (
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    SealedShares,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from privacy.prg import MaskStream
from privacy.shamir import Share, reconstruct

SESSION_BYTES = 16
_STAGES = ("keys", "shares", "masked", "unmask", "done")


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum of one round.

    ``total`` is the float64 sum of the survivors' updates, exact to ``error_bound`` per
    coordinate; ``dropped`` shared keys but sent no input (their masks were removed, their
    updates are not in the sum).
    """

    total: np.ndarray
    ring_total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    error_bound: float

    def mean(self) -> np.ndarray:
        """The survivors' mean update (FedAvg over equal-weight sites)."""
        return self.total / len(self.survivors)


class MaskingServer:
    """The cloud's state for one round.

    Args:
        config: the round's settings, identical at every party.
        round_idx: the round; bound into every derived key.
        session: the round's public random bytes (default: fresh from the OS); they salt every
            key derivation and shuffle the SecAgg+ graph.
    """

    def __init__(self, config: SecAggConfig, round_idx: int, session: bytes | None = None
                 ) -> None:
        self.config = config
        self.round = round_idx
        self.session = os.urandom(SESSION_BYTES) if session is None else bytes(session)
        self._stage = "keys"
        self._publics: dict[int, KeyAdvert] = {}
        self._graph: dict[int, frozenset[int]] = {}
        self._senders: frozenset[int] = frozenset()  # U2
        self._survivors: frozenset[int] = frozenset()  # U3
        self._total: np.ndarray | None = None

    @property
    def u1(self) -> tuple[int, ...]:
        """The sites that advertised keys."""
        return tuple(sorted(self._publics))

    @property
    def u2(self) -> tuple[int, ...]:
        """The sites that shared keys: what each site's masks may involve."""
        return tuple(sorted(self._senders))

    # ------------------------------------------------------------------ the four steps

    def collect_keys(self, adverts: Sequence[KeyAdvert]) -> KeyRoster:
        """Step 1: the roster of the sites that advertised keys, for all of them."""
        self._expect("keys")
        publics: dict[int, KeyAdvert] = {}
        for a in adverts:
            if a.site in publics:
                raise ProtocolError(f"site {a.site} advertised keys twice")
            if not 1 <= a.site < 2 ** 32:
                raise ProtocolError(f"site ids must be in [1, 2^32), got {a.site}")
            if len(a.channel_public) != KEY_BYTES or len(a.mask_public) != KEY_BYTES:
                raise ProtocolError(f"site {a.site}: public keys must be {KEY_BYTES} bytes")
            publics[a.site] = a
        if len(publics) > self.config.max_participants:
            raise ProtocolError(f"{len(publics)} sites advertised keys; the ring is sized for "
                                f"at most {self.config.max_participants}")
        self._need(len(publics), "site(s) advertised keys")
        self._publics = dict(sorted(publics.items()))
        self._graph = neighbour_graph(list(self._publics), self.config.neighbours, self.session)
        self._stage = "shares"
        return KeyRoster(self.round, self.session, tuple(self._publics.values()))

    def route_shares(self, bundles: Sequence[ShareBundle]) -> dict[int, ShareDelivery]:
        """Step 2: each sealed share to its recipient, and U2 (who shared) to everyone in it."""
        self._expect("shares")
        by_sender: dict[int, ShareBundle] = {}
        for b in bundles:
            if b.site not in self._publics or b.site in by_sender:
                raise ProtocolError(f"share bundle from site {b.site}: not advertised, or twice")
            recipients = sorted(s.recipient for s in b.sealed)
            if (any(s.sender != b.site for s in b.sealed)
                    or recipients != sorted(self._graph[b.site])):
                raise ProtocolError(f"site {b.site} must send one sealed share to each of its "
                                    f"neighbours {sorted(self._graph[b.site])}, sent to "
                                    f"{recipients}")
            by_sender[b.site] = b
        self._need(len(by_sender), "site(s) shared keys")
        senders = tuple(sorted(by_sender))
        inbox: dict[int, list[SealedShares]] = {u: [] for u in senders}
        for b in by_sender.values():
            for s in b.sealed:
                if s.recipient in inbox:  # shares for a site that dropped go nowhere
                    inbox[s.recipient].append(s)
        self._senders = frozenset(senders)
        self._stage = "masked"
        return {u: ShareDelivery(u, senders, tuple(inbox[u])) for u in senders}

    def collect_masked(self, inputs: Sequence[MaskedInput]) -> UnmaskRequest:
        """Step 3: sum the masked inputs that arrived (U3); ask the survivors to unmask."""
        self._expect("masked")
        fp, dim = self.config.fixed_point, self.config.dim
        total = fp.ring.zeros(dim)
        seen: set[int] = set()
        for m in inputs:
            if m.site not in self._senders or m.site in seen:
                raise ProtocolError(f"masked input from site {m.site}: it did not share keys, "
                                    "or sent twice")
            fp.ring.add_(total, fp.ring.check(m.vector, dim, f"masked input of site {m.site}"))
            seen.add(m.site)
        self._need(len(seen), "masked input(s) arrived")
        self._survivors = frozenset(seen)
        self._total = total
        self._stage = "unmask"
        return UnmaskRequest(tuple(sorted(seen)))

    def unmask(self, responses: Sequence[UnmaskResponse]) -> SecAggResult:
        """Step 4: rebuild the survivors' self-mask seeds and the dropped sites' mask keys from
        ``t`` shares each; remove the masks that do not cancel; decode the sum."""
        self._expect("unmask")
        if self._total is None:  # cannot happen: stage "unmask" is set with the total
            raise ProtocolError("no masked inputs collected")
        dropped = self._senders - self._survivors
        seed_shares, key_shares = self._gather(responses, dropped)
        t = self.config.threshold
        short = {f"{kind} of site {owner}": len(shares)
                 for kind, table in (("self-mask seed", seed_shares),
                                     ("mask key", key_shares))
                 for owner, shares in table.items() if len(shares) < t}
        if short:  # checked for every site before any work: abort cheaply
            raise SecAggAbort(f"fewer than t={t} shares came back for: " + ", ".join(
                f"{what} ({n})" for what, n in sorted(short.items())))
        fp, dim = self.config.fixed_point, self.config.dim
        ring, stream, total = fp.ring, MaskStream(fp.ring, dim), self._total.copy()
        for u, shares in sorted(seed_shares.items()):
            seed = _rebuild(shares, t, f"self-mask seed of site {u}")
            ring.sub_(total, stream.mask(self_mask_key(seed, self.session, self.round, u)))
        for v, shares in sorted(key_shares.items()):
            private = load_private(_rebuild(shares, t, f"mask key of site {v}"))
            if public_bytes(private) != self._publics[v].mask_public:
                raise ProtocolError(f"the mask key rebuilt for site {v} does not match the one "
                                    "it advertised (corrupted shares)")
            for u in sorted(self._graph[v] & self._survivors):
                m = stream.mask(pair_mask_key(private, self._publics[u].mask_public,
                                              self.session, self.round, v, u))
                if u < v:  # u added this mask; v, gone, never subtracted it
                    ring.sub_(total, m)
                else:
                    ring.add_(total, m)
        ring.reduce(total)
        self._stage = "done"
        survivors = tuple(sorted(self._survivors))
        return SecAggResult(fp.decode(total), total, survivors, tuple(sorted(dropped)),
                            fp.error_bound(len(survivors)))

    # ------------------------------------------------------------------ checks

    def _gather(self, responses: Sequence[UnmaskResponse], dropped: frozenset[int]
                ) -> tuple[dict[int, list[Share]], dict[int, list[Share]]]:
        """The shares per owner, after checking each responder answered what it was asked."""
        seeds: dict[int, list[Share]] = {u: [] for u in self._survivors}
        keys: dict[int, list[Share]] = {v: [] for v in dropped}
        seen: set[int] = set()
        for r in responses:
            if r.site not in self._survivors or r.site in seen:
                raise ProtocolError(f"unmask response from site {r.site}: not a survivor, or "
                                    "sent twice")
            seen.add(r.site)
            if not (r.seed_shares.keys() <= self._survivors and r.key_shares.keys() <= dropped):
                raise ProtocolError(f"site {r.site} sent shares it was not asked for")
            for table, part in ((seeds, r.seed_shares), (keys, r.key_shares)):
                for owner, share in part.items():
                    if share.x != r.site or (owner != r.site and owner not in self._graph[r.site]):
                        raise ProtocolError(f"site {r.site} sent a share of site {owner} it "
                                            "cannot hold")
                    table[owner].append(share)
        return seeds, keys

    def _need(self, count: int, what: str) -> None:
        if count < max(2, self.config.threshold):
            raise SecAggAbort(f"round {self.round}: {count} {what}; secure aggregation needs "
                              f"at least max(2, t={self.config.threshold})")

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            raise ProtocolError(f"round {self.round}: step {_STAGES.index(stage) + 1} called in "
                                f"stage {self._stage!r} (steps run once each, in order)")


def _rebuild(shares: list[Share], t: int, what: str) -> bytes:
    """The secret from ``t`` shares, checked against one more where there is one: that detects
    any single corrupted share (``t + 1`` points of a degree ``t - 1`` polynomial must agree),
    at the cost of one interpolation instead of one per extra share."""
    try:
        return reconstruct(sorted(shares, key=lambda s: s.x)[: t + 1], t, KEY_BYTES)
    except ValueError as err:
        raise ProtocolError(f"{what}: {err}") from None
