"""Shamir t-of-n secret sharing over a prime field (Shamir, 1979), for 32-byte keys and seeds.

Secure aggregation shares two secrets per site and round (its mask private key and its
self-mask seed) so that the cloud can finish the round when sites drop out: any ``t`` shares
give the secret back; ``t - 1`` shares are consistent with *every* secret, each by exactly one
polynomial of degree < t, so they say nothing about it. The field is GF(2^521 - 1): a Mersenne
prime, prime beyond doubt, and larger than any 32-byte secret, so a secret is one field element.

A share is a point ``(x, f(x))`` of a random polynomial ``f`` of degree ``t - 1`` with ``f(0)``
the secret; ``x`` is the holder's site id (>= 1). Reconstruction is Lagrange interpolation at
0. Given more than ``t`` shares, :func:`reconstruct` also checks that the extra ones lie on the
same polynomial, so a corrupted share is an error, not a wrong key.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PRIME = 2 ** 521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66: a share's y value on the wire


@dataclass(frozen=True)
class Share:
    """One point ``(x, y)`` of a sharing polynomial: ``x`` names the holder, ``y`` is the value."""

    x: int
    y: int


def split(secret: bytes, threshold: int, holders: Iterable[int], *, prime: int = PRIME
          ) -> dict[int, Share]:
    """Shares of ``secret`` for each holder id (x coordinates), any ``threshold`` of which
    reconstruct it; coefficients come from the OS's CSPRNG."""
    xs = _check_xs(holders, prime)
    value = int.from_bytes(secret, "big")
    if value >= prime:
        raise ValueError(f"secret of {len(secret)} bytes does not fit the field (< 2^"
                         f"{prime.bit_length() - 1})")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}] for {len(xs)} holders, "
                         f"got {threshold}")
    coeffs = [value] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    return {x: Share(x, evaluate(coeffs, x, prime)) for x in xs}


def evaluate(coeffs: Sequence[int], x: int, prime: int = PRIME) -> int:
    """``sum(c_i x^i) mod prime`` by Horner's rule (``coeffs[0]`` is the constant term)."""
    y = 0
    for c in reversed(coeffs):
        y = (y * x + c) % prime
    return y


def interpolate(points: Sequence[Share], at: int, prime: int = PRIME) -> int:
    """The value at ``at`` of the one polynomial of degree < ``len(points)`` through ``points``."""
    xs = tuple(p.x % prime for p in points)
    if len(set(xs)) != len(xs):
        raise ValueError(f"interpolation points must have distinct x, got {sorted(xs)}")
    weights = _lagrange_weights(xs, at % prime, prime)
    return sum(w * p.y for w, p in zip(weights, points, strict=True)) % prime


def reconstruct(shares: Sequence[Share], threshold: int, size: int, *, prime: int = PRIME
                ) -> bytes:
    """The ``size``-byte secret from at least ``threshold`` shares.

    Raises ``ValueError`` with fewer shares (they determine nothing), with repeated holders,
    or when shares beyond the first ``threshold`` disagree with the polynomial those define.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} share(s) cannot reconstruct a secret shared with "
                         f"threshold {threshold}: every secret is equally consistent with them")
    _check_xs([s.x for s in shares], prime)
    base = list(shares[:threshold])
    for extra in shares[threshold:]:
        if interpolate(base, extra.x, prime) != extra.y % prime:
            raise ValueError(f"share of holder {extra.x} is inconsistent with the others "
                             "(corrupted, or from another secret)")
    value = interpolate(base, 0, prime)
    if value >= 1 << (8 * size):
        raise ValueError(f"reconstructed value does not fit {size} bytes: shares of another "
                         "secret, or a wrong threshold")
    return value.to_bytes(size, "big")


def _check_xs(holders: Iterable[int], prime: int) -> tuple[int, ...]:
    xs = tuple(int(x) for x in holders)
    if not xs:
        raise ValueError("no holders")
    if any(not 0 < x < prime for x in xs):
        raise ValueError(f"holder ids must be in [1, prime), got {sorted(xs)}")
    if len(set(xs)) != len(xs):
        raise ValueError(f"holder ids must be distinct, got {sorted(xs)}")
    return xs


@functools.lru_cache(maxsize=256)
def _lagrange_weights(xs: tuple[int, ...], at: int, prime: int) -> tuple[int, ...]:
    """Weights ``w_j`` with ``f(at) = sum w_j f(x_j)``; cached, since the cloud reconstructs many
    secrets from the same set of surviving holders."""
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % prime
                den = den * (xj - xm) % prime
        out.append(num * pow(den, -1, prime) % prime)
    return tuple(out)
