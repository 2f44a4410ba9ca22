"""The pseudorandom generator that expands a 32-byte seed into a mask: ChaCha20's keystream.

A mask must be as long as the model (1e5 ring elements and more) yet be agreed on from a short
seed by two sites, or recomputed by the cloud from a reconstructed seed. A stream cipher's
keystream is exactly that; ChaCha20 from ``cryptography`` (OpenSSL) produces several GB/s. Every
seed is a fresh HKDF output used for one mask only, so the nonce can be fixed at zero.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privacy.fixed_point import Ring
from privacy.keys import KEY_BYTES

_NONCE = bytes(16)  # ChaCha20 in cryptography: 4-byte block counter + 12-byte nonce, all zero


class MaskStream:
    """Masks of one length in one ring; keeps a zero buffer to encrypt, reused for every mask."""

    def __init__(self, ring: Ring, dim: int) -> None:
        self.ring = ring
        self.dim = dim
        self._zeros = bytes(dim * ring.dtype.itemsize)

    def mask(self, key: bytes) -> np.ndarray:
        """``dim`` uniform ring elements determined by ``key`` (read-only array)."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"a mask seed has {KEY_BYTES} bytes, got {len(key)}")
        stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
        return self.ring.from_bytes(stream.update(self._zeros), self.dim)
