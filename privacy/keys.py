"""Key agreement (X25519) and key derivation (HKDF-SHA256), all from ``cryptography``.

Two sites that publish X25519 public keys agree on a shared secret without the cloud, which
routes the public keys, learning it (Diffie-Hellman). Raw agreement output is not used as a
key: HKDF-SHA256 turns it into a 32-byte key bound to a purpose, the round's session (random
bytes the cloud picks for the round), the round index and the site ids, so that a key for one
use (a pairwise mask, the channel that carries key shares, a self mask) is unrelated to every
other.

Every key pair lives for one round only: when a site drops, the cloud reconstructs its mask
private key to cancel its masks, and a key reused in a later round would then let the cloud
strip that site's pairwise masks there too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.errors import ProtocolError

KEY_BYTES = 32  # X25519 keys, agreement output, derived keys and seeds alike
Purpose = Literal["pair-mask", "share-channel", "self-mask"]
_DOMAIN = b"edgemeta/secagg/v1"


@dataclass(frozen=True)
class KeyPair:
    """A fresh X25519 key pair: the private key object and the raw 32-byte public key."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        private = X25519PrivateKey.generate()
        return cls(private, public_bytes(private))

    def private_raw(self) -> bytes:
        """The raw private key (what the site secret-shares so a dropout can be unmasked)."""
        return self.private.private_bytes_raw()


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)


def load_private(raw: bytes) -> X25519PrivateKey:
    """A private key from its 32 raw bytes (as reconstructed from shares)."""
    if len(raw) != KEY_BYTES:
        raise ProtocolError(f"an X25519 private key has {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret with the holder of ``peer_public``."""
    if len(peer_public) != KEY_BYTES:
        raise ProtocolError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(peer_public)}")
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # a low-order point: the agreement would be all zeros
        raise ProtocolError(f"unusable X25519 public key: {err}") from None


def derive(secret: bytes, purpose: Purpose, session: bytes, round_idx: int, *ids: int) -> bytes:
    """A 32-byte key for ``purpose`` from ``secret`` (HKDF-SHA256; the session is the salt,
    the purpose, round and ids the info)."""
    info = b"|".join([_DOMAIN, purpose.encode(), struct.pack(">Q", round_idx),
                      b"".join(struct.pack(">I", i) for i in ids)])
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session,
                info=info).derive(secret)


def pair_mask_key(private: X25519PrivateKey, peer_public: bytes, session: bytes,
                  round_idx: int, u: int, v: int) -> bytes:
    """The seed of the mask sites ``u`` and ``v`` share this round: both ends (and the cloud,
    given a dropped site's reconstructed private key) derive the same one."""
    return derive(agree(private, peer_public), "pair-mask", session, round_idx,
                  min(u, v), max(u, v))


def self_mask_key(seed: bytes, session: bytes, round_idx: int, u: int) -> bytes:
    """The key of site ``u``'s own mask, from the seed it secret-shares."""
    return derive(seed, "self-mask", session, round_idx, u)


def channel_key(private: X25519PrivateKey, peer_public: bytes, session: bytes,
                round_idx: int, u: int, v: int) -> bytes:
    """The AES-GCM key for the shares ``u`` and ``v`` send each other through the cloud."""
    return derive(agree(private, peer_public), "share-channel", session, round_idx,
                  min(u, v), max(u, v))
