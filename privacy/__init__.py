"""Privacy of the sites' updates: secure aggregation (Bonawitz et al., 2017; SecAgg+ graph of
Bell et al., 2020), pure Python + numpy + ``cryptography``, nothing of Ray or torch.

The cloud learns only the sum of the participating sites' updates. Modules, one idea each:

* :mod:`privacy.fixed_point` — floats into the ring Z_{2^k}, scaled by the clip bound and the
  number of participants so that a sum cannot wrap; documented error bound.
* :mod:`privacy.shamir` — t-of-n secret sharing of 32-byte keys and seeds.
* :mod:`privacy.keys` — X25519 agreement and HKDF-SHA256 derivation of per-round keys.
* :mod:`privacy.prg` — ChaCha20 keystream expanded into ring-element masks.
* :mod:`privacy.sealed` — AES-GCM for the shares sites send each other through the cloud.
* :mod:`privacy.graph` — who masks with whom: complete graph, or SecAgg+'s sparse random graph.
* :mod:`privacy.config`, :mod:`privacy.messages`, :mod:`privacy.errors` — the round's settings,
  its messages, its failures.
* :mod:`privacy.client` (:class:`MaskingClient`, a site) and :mod:`privacy.server`
  (:class:`MaskingServer`, the cloud) — the protocol's four steps on each side.
"""

from privacy.client import MaskingClient
from privacy.config import SecAggConfig, majority_threshold
from privacy.errors import ProtocolError, SecAggAbort, SecAggError
from privacy.server import MaskingServer, SecAggResult

__all__ = ["MaskingClient", "MaskingServer", "ProtocolError", "SecAggAbort", "SecAggConfig",
           "SecAggError", "SecAggResult", "majority_threshold"]
