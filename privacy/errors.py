"""The ways a secure-aggregation round can fail, told apart so that a driver can react.

* :class:`SecAggAbort`: too few sites are left (or too few shares came back) to finish the round
  safely. Nothing is wrong with anyone's messages; the round is skipped, like a round below
  quorum, and the next one starts with fresh keys.
* :class:`ProtocolError`: a message is malformed, out of order, or does not verify (a tampered
  share, a key that does not match its advertisement). That is a bug or a misbehaving party,
  never a dropout, so it is not silently absorbed.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of the secure-aggregation failures."""


class SecAggAbort(SecAggError):
    """The round cannot complete: fewer than the threshold of sites or shares remain."""


class ProtocolError(SecAggError):
    """A message broke the protocol (malformed, out of order, or failed verification)."""
