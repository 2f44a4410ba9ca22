"""Who masks with whom: every pair of sites (SecAgg), or a sparse random graph (SecAgg+).

In the original protocol (Bonawitz et al., 2017) every site agrees a mask with, and sends key
shares to, every other site: O(n) work and messages per site, O(n^2) in all. SecAgg+ (Bell et
al., 2020) keeps the same steps on a random k-regular graph with k = O(log n): the masks of two
neighbours still cancel in the sum, and with the sites placed at random the cloud (with fewer
than t colluding sites) cannot isolate a site's update, with high probability over the graph.

The graph here is a Harary graph H(k, n): the sites on a ring, each joined to the k/2 nearest
on either side, after shuffling the ring by the round's public session bytes (the order is a
SHA-256 of session and id, so every site and the cloud compute the same graph, whatever their
numpy). ``degree=None``, or a degree of at least ``n - 1``, is the complete graph.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def neighbour_graph(sites: Sequence[int], degree: int | None, session: bytes
                    ) -> dict[int, frozenset[int]]:
    """Each site's neighbours (itself excluded); symmetric by construction."""
    ids = sorted(set(sites))
    if len(ids) != len(sites):
        raise ValueError(f"site ids must be distinct, got {sorted(sites)}")
    n = len(ids)
    if degree is None or degree >= n - 1:
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in ids}
    if degree < 2 or degree % 2:
        raise ValueError(f"neighbour degree must be an even number >= 2, got {degree}")
    ring = sorted(ids, key=lambda u: hashlib.sha256(session + struct.pack(">I", u)).digest())
    half = degree // 2
    return {u: frozenset(ring[(i + j) % n] for j in range(-half, half + 1) if j)
            for i, u in enumerate(ring)}


def secagg_plus_degree(n: int) -> int:
    """A SecAgg+ degree for ``n`` sites: the even number at or above 2 log2 n (Bell et al.
    take k = O(log n); the constant trades cost for the failure probability)."""
    return 2 * max(1, (n - 1).bit_length())
