"""Float vectors in the ring Z_{2^k}, scaled so that a sum of clipped vectors never wraps.

Masking needs exact arithmetic modulo a fixed modulus (a mask added by one site must cancel
exactly against the same mask subtracted by another); floats do not give that. A power-of-two
ring does, for free: numpy's unsigned integers wrap modulo 2^32 or 2^64, and a uniform
keystream is a uniform ring element without any rejection step.

Sizing. Each site clips its update to L2 norm ``C``, so every coordinate lies in ``[-C, C]``,
and the sum of ``n`` updates in ``[-n C, n C]``. Values are encoded as ``round(x * scale)`` in
two's complement; the scale is the largest for which ``n`` encoded coordinates, each at most
``C * scale + 1/2`` in magnitude, sum to less than ``2^(k-1)``, with a 2^-30 relative margin
that absorbs float64 rounding of the scale itself::

    scale = (2^(k-1) * (1 - 2^-30) / n - 1) / C

so the signed sum of any ``n`` (or fewer) encoded vectors is decoded exactly, whatever the
signs. Per coordinate, the decoded sum of ``m <= n`` vectors differs from their true sum by at
most ``m / (2 scale) + m C 2^-50`` (:meth:`FixedPoint.error_bound`): half a step of rounding per
site, plus float64 rounding in the products (≤ 2^-53 relative, counted generously).
"""

from __future__ import annotations

import math

import numpy as np

MIN_BITS = 8
MAX_BITS = 64
NORM_SLACK = 1e-5  # a float32 vector clipped to C can come out a few ulps above C


class Ring:
    """Z_{2^bits}, stored in the narrowest unsigned numpy type that holds it.

    Vectors are added and subtracted in place (numpy wraps modulo the word size, and 2^bits
    divides it); :meth:`reduce` brings a result back into ``[0, 2^bits)`` for ``bits`` below the
    word size.
    """

    def __init__(self, bits: int) -> None:
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"ring bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
        self.bits = bits
        self.dtype = np.dtype(np.uint32 if bits <= 32 else np.uint64)
        self.word_bits = self.dtype.itemsize * 8
        self.mask = self.dtype.type((1 << bits) - 1)

    def __repr__(self) -> str:
        return f"Ring(bits={self.bits})"

    def zeros(self, dim: int) -> np.ndarray:
        return np.zeros(dim, dtype=self.dtype)

    def reduce(self, a: np.ndarray) -> np.ndarray:
        """``a`` modulo 2^bits, in place (a no-op when the ring fills the word)."""
        if self.bits < self.word_bits:
            np.bitwise_and(a, self.mask, out=a)
        return a

    def add_(self, acc: np.ndarray, x: np.ndarray) -> None:
        np.add(acc, x, out=acc)

    def sub_(self, acc: np.ndarray, x: np.ndarray) -> None:
        np.subtract(acc, x, out=acc)

    def from_bytes(self, buf: bytes, dim: int) -> np.ndarray:
        """``dim`` ring elements from ``dim * itemsize`` bytes (uniform bytes give uniform
        elements: the modulus is a power of two, so there is no bias to reject)."""
        a = np.frombuffer(buf, dtype=self.dtype, count=dim)
        if self.bits < self.word_bits:
            a = a & self.mask
        return a

    def check(self, a: object, dim: int, what: str) -> np.ndarray:
        """``a`` if it is a vector of this ring of length ``dim``; a clear error otherwise."""
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{what}: expected a numpy array, got {type(a).__name__}")
        if a.dtype != self.dtype or a.shape != (dim,):
            raise ValueError(f"{what}: expected {self.dtype} of shape ({dim},), "
                             f"got {a.dtype} of shape {a.shape}")
        if self.bits < self.word_bits and dim and int(a.max()) > int(self.mask):
            raise ValueError(f"{what}: values outside Z_2^{self.bits}")
        return a

    def to_signed(self, a: np.ndarray) -> np.ndarray:
        """Two's-complement reading: ``[0, 2^bits)`` onto ``[-2^(bits-1), 2^(bits-1))``, int64."""
        if self.bits == 64:
            return a.view(np.int64)
        s = a.astype(np.int64)
        s[s >= (1 << (self.bits - 1))] -= 1 << self.bits
        return s


class FixedPoint:
    """Encode clipped float vectors into a :class:`Ring` and decode sums of up to ``n`` of them.

    Args:
        clip: the L2 bound ``C`` every encoded vector respects (each site clips to it).
        n: the most vectors that will ever be summed (the number of participants).
        bits: ``k``, the ring's size in bits (32 costs what float32 costs on the wire).
    """

    def __init__(self, clip: float, n: int, bits: int) -> None:
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip bound must be a positive finite number, got {clip}")
        if n < 1:
            raise ValueError(f"n (participants) must be >= 1, got {n}")
        self.ring = Ring(bits)
        self.clip = float(clip)
        self.n = int(n)
        steps = 2.0 ** (bits - 1) * (1 - 2.0 ** -30) / n - 1  # scale * C
        if steps < 2 ** 8:
            raise ValueError(f"a {bits}-bit ring leaves {n} participants fewer than 8 bits of "
                             "resolution each: use more bits or fewer participants")
        self.scale = steps / self.clip

    def __repr__(self) -> str:
        return f"FixedPoint(clip={self.clip}, n={self.n}, bits={self.ring.bits})"

    def error_bound(self, summed: int | None = None) -> float:
        """Largest per-coordinate error of a decoded sum of ``summed`` (default ``n``) vectors."""
        m = self.n if summed is None else summed
        return m / (2 * self.scale) + m * self.clip * 2.0 ** -50

    def encode(self, x: object, dim: int | None = None) -> np.ndarray:
        """``x`` (1-D, finite, L2 norm <= C) as a ring vector.

        Coordinates are clamped to ``[-C, C]`` (a no-op for a vector clipped to C; it only
        absorbs the float32 slack that :data:`NORM_SLACK` allows), so no input can make a sum
        wrap.
        """
        v = np.asarray(x, dtype=np.float64)
        if v.ndim != 1 or (dim is not None and v.shape[0] != dim):
            want = "a 1-D vector" if dim is None else f"shape ({dim},)"
            raise ValueError(f"update: expected {want}, got shape {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError("update: contains NaN or infinite values")
        norm = float(np.linalg.norm(v))
        if norm > self.clip * (1 + NORM_SLACK):
            raise ValueError(f"update: L2 norm {norm:.6g} exceeds the clip bound {self.clip:.6g}; "
                             "clip it first (privacy.fixed_point.clip_l2)")
        q = np.rint(np.clip(v, -self.clip, self.clip) * self.scale).astype(np.int64)
        # int64 -> uint64 is two's complement; keeping the low ``bits`` bits is the reduction.
        low = q.astype(np.uint64) & np.uint64((1 << self.ring.bits) - 1)
        return low.astype(self.ring.dtype)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """A ring vector that is the sum of at most ``n`` encodings, as float64."""
        return self.ring.to_signed(total).astype(np.float64) / self.scale


def clip_l2(x: object, clip: float) -> np.ndarray:
    """``x`` scaled down (never up) to L2 norm at most ``clip``, as float64."""
    v = np.asarray(x, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    return v * (clip / norm) if norm > clip else v.copy()
