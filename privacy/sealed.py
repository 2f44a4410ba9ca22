"""Authenticated encryption of the key shares one site sends another through the cloud.

Shares travel site -> cloud -> site. Were they in clear, the cloud would hold every share of
every secret and could unmask every site; encrypted under a key only the two sites can derive
(X25519 + HKDF, :func:`privacy.keys.channel_key`) with AES-256-GCM, the cloud only routes them.
The associated data binds a ciphertext to its round, session, sender and recipient, so the cloud
cannot replay one site's shares as another's. Both directions of a pair use the same key, so
each message carries a random 96-bit nonce.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy.errors import ProtocolError

NONCE_BYTES = 12
TAG_BYTES = 16


def associated_data(session: bytes, round_idx: int, sender: int, recipient: int) -> bytes:
    return session + struct.pack(">QII", round_idx, sender, recipient)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``nonce || ciphertext || tag``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output; a :class:`ProtocolError` if it does not verify
    (tampered, or not addressed to this recipient in this round)."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ProtocolError(f"sealed share too short ({len(blob)} bytes)")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise ProtocolError("a sealed share failed authentication (tampered, or addressed to "
                            "another site or round)") from None
