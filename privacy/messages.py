"""The messages of one secure-aggregation round, in the order they travel.

Four exchanges, each a call from the cloud to every remaining site and the replies::

    1. advertise keys   site -> cloud  KeyAdvert          cloud -> sites  KeyRoster
    2. share keys       site -> cloud  ShareBundle        cloud -> site   ShareDelivery
    3. masked input     site -> cloud  MaskedInput        cloud -> sites  UnmaskRequest
    4. unmasking        site -> cloud  UnmaskResponse     (the cloud now has the sum)

All are frozen values of bytes, ints and one numpy vector, so they pickle as they are for Ray.
``nbytes`` is the payload each would take in a compact encoding (ids 4 bytes, keys 32, shares
:data:`privacy.shamir.SHARE_BYTES`), for the benchmark's byte counts; pickling adds a little.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from privacy.keys import KEY_BYTES
from privacy.shamir import SHARE_BYTES, Share

ID_BYTES = 4


@dataclass(frozen=True)
class KeyAdvert:
    """A site's two fresh public keys: one to agree masks, one to agree share channels (kept
    apart so that revealing a dropped site's mask key does not open its share channels)."""

    site: int
    channel_public: bytes
    mask_public: bytes

    @property
    def nbytes(self) -> int:
        return ID_BYTES + 2 * KEY_BYTES


@dataclass(frozen=True)
class KeyRoster:
    """Everyone's public keys, and the round's public session bytes (HKDF salt, graph seed)."""

    round: int
    session: bytes
    adverts: tuple[KeyAdvert, ...]

    @property
    def nbytes(self) -> int:
        return 8 + len(self.session) + sum(a.nbytes for a in self.adverts)

    def sites(self) -> tuple[int, ...]:
        return tuple(a.site for a in self.adverts)


@dataclass(frozen=True)
class SealedShares:
    """A sender's shares (of its mask key and self-mask seed) for one recipient, AES-GCM sealed."""

    sender: int
    recipient: int
    blob: bytes

    @property
    def nbytes(self) -> int:
        return 2 * ID_BYTES + len(self.blob)


@dataclass(frozen=True)
class ShareBundle:
    """What a site sends in step 2: sealed shares for each of its neighbours."""

    site: int
    sealed: tuple[SealedShares, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES + sum(s.nbytes for s in self.sealed)


@dataclass(frozen=True)
class ShareDelivery:
    """What the cloud routes to one site: who shared keys (U2; the site masks with those of
    them that are its neighbours), and the sealed shares addressed to it."""

    recipient: int
    senders: tuple[int, ...]
    sealed: tuple[SealedShares, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES * (1 + len(self.senders)) + sum(s.nbytes for s in self.sealed)


@dataclass(frozen=True)
class MaskedInput:
    """A site's update, encoded in the ring and masked: uniformly random on its own."""

    site: int
    vector: np.ndarray

    @property
    def nbytes(self) -> int:
        return ID_BYTES + int(self.vector.nbytes)


@dataclass(frozen=True)
class UnmaskRequest:
    """The sites whose masked inputs arrived (U3); every other site of U2 counts as dropped."""

    survivors: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES * len(self.survivors)


@dataclass(frozen=True)
class UnmaskResponse:
    """A surviving site's shares: of the self-mask seeds of survivors, and of the mask private
    keys of the dropped; never both for one site (that would reveal its update)."""

    site: int
    seed_shares: Mapping[int, Share]  # owner (a survivor) -> this site's share of its seed
    key_shares: Mapping[int, Share]  # owner (a dropped site) -> share of its mask private key

    @property
    def nbytes(self) -> int:
        return ID_BYTES + (ID_BYTES + SHARE_BYTES) * (len(self.seed_shares) + len(self.key_shares))
