"""A site's side of one secure-aggregation round (Bonawitz et al., 2017, honest-but-curious).

One :class:`MaskingClient` per site per round: its keys are fresh each round (a dropped site's
mask key is revealed to the cloud, so it must never mask another round). The four methods are
the four steps, called in order, each with what the cloud sent::

    client = MaskingClient(site, config, round_idx)
    advert = client.advertise_keys()                  # -> cloud
    bundle = client.share_keys(roster)                # roster: everyone's public keys
    masked = client.masked_input(update, delivery)    # delivery: shares addressed to this site
    reply = client.unmask(request)                    # request: which sites' inputs arrived

What the cloud receives in step 3 is ``encode(update) + PRG(b_u) + sum_v ±PRG(s_uv)``: the pairwise
masks ``s_uv`` (agreed with each neighbour ``v`` by X25519, ``+`` if ``u < v``) cancel in the sum
over sites; the self mask ``b_u`` (a random seed) is removed by the cloud only once ``t`` sites
confirm ``u``'s input arrived. So a site the cloud declared dropped and whose input comes late
is still hidden by ``b_u``, and a site that drops after sending stays in the sum.
"""

from __future__ import annotations

import secrets
import struct

from privacy.config import SecAggConfig
from privacy.errors import ProtocolError, SecAggAbort
from privacy.graph import neighbour_graph
from privacy.keys import KEY_BYTES, KeyPair, channel_key, pair_mask_key, self_mask_key
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
from privacy.sealed import associated_data, seal, unseal
from privacy.shamir import SHARE_BYTES, Share, split

_IDS = struct.Struct(">II")
_STAGES = ("new", "advertised", "shared", "masked", "done")


class MaskingClient:
    """One site's keys, shares and masks for one round.

    Args:
        site: this site's id in the round, >= 1 (it is also its Shamir x coordinate).
        config: the round's settings, identical at every party.
        round_idx: the round; bound into every derived key and sealed share.
    """

    def __init__(self, site: int, config: SecAggConfig, round_idx: int) -> None:
        if not 1 <= site < 2 ** 32:
            raise ValueError(f"site ids must be in [1, 2^32), got {site}")
        self.site = site
        self.config = config
        self.round = round_idx
        self._stage = "new"
        self._channel = KeyPair.generate()
        self._mask = KeyPair.generate()
        self._seed = secrets.token_bytes(KEY_BYTES)  # b_u, the self-mask seed
        self._session = b""
        self._publics: dict[int, KeyAdvert] = {}
        self._neighbours: frozenset[int] = frozenset()
        self._senders: frozenset[int] = frozenset()  # U2
        self._held: dict[int, tuple[Share, Share]] = {}  # owner -> (key share, seed share)
        self._channels: dict[int, bytes] = {}

    # ------------------------------------------------------------------ the four steps

    def advertise_keys(self) -> KeyAdvert:
        """Step 1: this round's two public keys."""
        self._expect("new")
        self._stage = "advertised"
        return KeyAdvert(self.site, self._channel.public, self._mask.public)

    def share_keys(self, roster: KeyRoster) -> ShareBundle:
        """Step 2: t-of-(neighbours + 1) shares of the mask private key and the self-mask seed,
        each neighbour's pair sealed under a key only it and this site can derive."""
        self._expect("advertised")
        self._read_roster(roster)
        graph = neighbour_graph(list(self._publics), self.config.neighbours, roster.session)
        self._neighbours = graph[self.site]
        holders = sorted(self._neighbours | {self.site})
        t = self.config.threshold
        if len(holders) < t:
            raise SecAggAbort(f"site {self.site}: {len(holders)} holder(s) for its shares, "
                              f"threshold {t}")
        key_shares = split(self._mask.private_raw(), t, holders)
        seed_shares = split(self._seed, t, holders)
        self._held[self.site] = (key_shares[self.site], seed_shares[self.site])
        sealed = []
        for v in sorted(self._neighbours):
            payload = (_IDS.pack(self.site, v) + _y_bytes(key_shares[v])
                       + _y_bytes(seed_shares[v]))
            blob = seal(self._channel_key(v), payload,
                        associated_data(self._session, self.round, self.site, v))
            sealed.append(SealedShares(self.site, v, blob))
        self._stage = "shared"
        return ShareBundle(self.site, tuple(sealed))

    def masked_input(self, update: object, delivery: ShareDelivery) -> MaskedInput:
        """Step 3: the update (clipped to ``config.clip``) in the ring, plus the self mask,
        plus or minus a mask per neighbour that shared keys."""
        self._expect("shared")
        encoded = self.config.fixed_point.encode(update, self.config.dim)
        senders = self._read_delivery(delivery)
        ring, dim = self.config.fixed_point.ring, self.config.dim
        stream = MaskStream(ring, dim)
        y = encoded
        ring.add_(y, stream.mask(self_mask_key(self._seed, self._session, self.round, self.site)))
        for v in sorted(self._neighbours & senders):
            m = stream.mask(pair_mask_key(self._mask.private, self._publics[v].mask_public,
                                          self._session, self.round, self.site, v))
            if self.site < v:
                ring.add_(y, m)
            else:
                ring.sub_(y, m)
        self._senders = senders
        self._stage = "masked"
        return MaskedInput(self.site, ring.reduce(y))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Step 4: shares of the self-mask seeds of the survivors and of the mask keys of the
        dropped (U2 minus survivors), never both for one site; answered once per round."""
        self._expect("masked")
        survivors = frozenset(request.survivors)
        if len(survivors) != len(request.survivors):
            raise ProtocolError("unmask request: survivors repeated")
        if not survivors <= self._senders:
            raise ProtocolError(f"unmask request names sites that never shared keys: "
                                f"{sorted(survivors - self._senders)}")
        if self.site not in survivors:
            raise ProtocolError(f"site {self.site} is not among the survivors: it takes no part "
                                "in unmasking")
        if len(survivors) < self.config.threshold:
            raise SecAggAbort(f"{len(survivors)} survivor(s), threshold "
                              f"{self.config.threshold}")
        self._stage = "done"  # before answering: a second request is refused, whatever it says
        dropped = self._senders - survivors
        return UnmaskResponse(
            self.site,
            seed_shares={v: s for v, (_, s) in self._held.items() if v in survivors},
            key_shares={v: k for v, (k, _) in self._held.items() if v in dropped})

    # ------------------------------------------------------------------ checks

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            step = _STAGES.index(stage) + 1
            raise ProtocolError(f"site {self.site}, round {self.round}: step {step} called in "
                                f"stage {self._stage!r} (steps run once each, in order)")

    def _read_roster(self, roster: KeyRoster) -> None:
        if roster.round != self.round:
            raise ProtocolError(f"roster of round {roster.round} sent to round {self.round}")
        publics = {a.site: a for a in roster.adverts}
        if len(publics) != len(roster.adverts):
            raise ProtocolError("roster: a site advertised twice")
        mine = publics.get(self.site)
        if mine is None or (mine.channel_public, mine.mask_public) != (
                self._channel.public, self._mask.public):
            raise ProtocolError(f"roster: site {self.site}'s own keys are missing or altered")
        if len(publics) > self.config.max_participants:
            raise ProtocolError(f"roster of {len(publics)} sites exceeds max_participants "
                                f"{self.config.max_participants} (the ring could wrap)")
        if len(publics) < self.config.threshold:
            raise SecAggAbort(f"{len(publics)} site(s) advertised keys, threshold "
                              f"{self.config.threshold}")
        self._publics = publics
        self._session = roster.session

    def _read_delivery(self, delivery: ShareDelivery) -> frozenset[int]:
        """U2 from the delivery, after opening every share addressed to this site."""
        if delivery.recipient != self.site:
            raise ProtocolError(f"shares for site {delivery.recipient} delivered to {self.site}")
        senders = frozenset(delivery.senders)
        if not senders <= self._publics.keys() or self.site not in senders:
            raise ProtocolError("delivery: senders must be advertised sites, this one included")
        alive = senders & (self._neighbours | {self.site})
        if len(alive) < self.config.threshold:
            raise SecAggAbort(f"site {self.site}: {len(alive)} holder(s) of its shares left, "
                              f"threshold {self.config.threshold}")
        expected = self._neighbours & senders
        got = [s.sender for s in delivery.sealed]
        if sorted(got) != sorted(expected):
            raise ProtocolError(f"delivery to site {self.site}: shares from {sorted(got)}, "
                                f"expected one from each of {sorted(expected)}")
        for sealed in delivery.sealed:
            v = sealed.sender
            payload = unseal(self._channel_key(v), sealed.blob,
                             associated_data(self._session, self.round, v, self.site))
            if len(payload) != _IDS.size + 2 * SHARE_BYTES or _IDS.unpack_from(payload) != (
                    v, self.site):
                raise ProtocolError(f"share from site {v}: malformed payload")
            key_y = int.from_bytes(payload[_IDS.size:_IDS.size + SHARE_BYTES], "big")
            seed_y = int.from_bytes(payload[_IDS.size + SHARE_BYTES:], "big")
            self._held[v] = (Share(self.site, key_y), Share(self.site, seed_y))
        return senders

    def _channel_key(self, v: int) -> bytes:
        """The key of the channel to ``v`` (agreed once, used both ways)."""
        if v not in self._channels:
            self._channels[v] = channel_key(self._channel.private, self._publics[v].channel_public,
                                            self._session, self.round, self.site, v)
        return self._channels[v]


def _y_bytes(share: Share) -> bytes:
    return share.y.to_bytes(SHARE_BYTES, "big")
