"""Privacy of the sites' contributions, with nothing of Ray.

Secure aggregation (Bonawitz et al., 2017; SecAgg+ graph of Bell et al., 2020), pure Python +
numpy + ``cryptography``: the cloud learns only the sum of the participating sites' updates.

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

Differential privacy (DP-FedAvg, client level), in torch: :mod:`privacy.noise` (Gaussian noise
from a cryptographically secure source), :mod:`privacy.dp` (clipping at the site, the noised
sum with a fixed denominator at the cloud, adaptive clipping) and :mod:`privacy.accounting`
(epsilon over rounds with ``dp-accounting``). Threat models: ``docs/PRIVACY.md``.

Nothing is imported here: an edge that only clips and noises does not load ``cryptography``.
"""
