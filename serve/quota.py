"""A bound on the adapted-model store: how many models and bytes ``/v1/adapt`` may keep.

Every distinct adaptation writes a model file (~454 KB for the Omniglot conv net), so without a
bound a stream of clients fills the disk (a chaos run: 8 clients for 60 s wrote 2.3 GB in 5,076
files). The store keeps at most ``max_models`` adapted models and ``max_bytes`` of them per run
folder, and optionally none unused for longer than ``ttl_s``; past the bound it evicts the
least recently *used* ones (an adaptation repeated, or a model loaded to predict with, counts as
a use). Content addressing is untouched: an evicted id is simply unknown (404) until the same
``/v1/adapt`` request makes it again, under the same id.

This module is the policy only: which entries to evict, given what is stored. It reads and
deletes nothing, so the store keeps whatever storage it uses (files here, objects elsewhere);
the store lists its entries, asks :func:`evictions`, deletes, and reports :class:`Usage`.
The bound holds per run folder; several replicas may enforce it at once (a file another one
deleted first is simply gone), so the count may dip below the bound, never stay above it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StoreQuota:
    """The bound (from the serve settings ``adapted_max_models``, ``adapted_max_bytes``,
    ``adapted_ttl_s``). A model just written is always kept, even if it alone is larger."""

    max_models: int
    max_bytes: int
    ttl_s: float | None = None

    def describe(self) -> dict[str, int | float | None]:
        return {"max_models": self.max_models, "max_bytes": self.max_bytes,
                "ttl_s": self.ttl_s}


@dataclass(frozen=True)
class Entry:
    """One stored adapted model: its key, its size, and when it was last used (epoch s)."""

    key: str
    bytes: int
    last_used: float


@dataclass(frozen=True)
class Usage:
    """What the store holds after enforcing its quota, for ``GET /v1/models``."""

    models: int
    bytes: int


def evictions(entries: Iterable[Entry], quota: StoreQuota, now: float,
              keep: Collection[str] = ()) -> list[str]:
    """The keys to delete so that what is left fits ``quota``: every entry past its TTL, then
    the least recently used until both the count and the bytes fit. ``keep`` (the model just
    written or read) is never chosen."""
    live = sorted(entries, key=lambda e: (e.last_used, e.key))
    out: list[str] = []
    if quota.ttl_s is not None:
        expired = {e.key for e in live if now - e.last_used > quota.ttl_s and e.key not in keep}
        out.extend(e.key for e in live if e.key in expired)
        live = [e for e in live if e.key not in expired]
    count, total = len(live), sum(e.bytes for e in live)
    for e in live:
        if count <= quota.max_models and total <= quota.max_bytes:
            break
        if e.key in keep:
            continue
        out.append(e.key)
        count, total = count - 1, total - e.bytes
    return out
