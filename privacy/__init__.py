"""Privacy of the sites' contributions, in pure Python and torch (no Ray).

Differential privacy (DP-FedAvg, client level): :mod:`privacy.noise` (Gaussian noise from a
cryptographically secure source), :mod:`privacy.dp` (clipping at the site, the noised sum with
a fixed denominator at the cloud, adaptive clipping) and :mod:`privacy.accounting` (epsilon over
rounds with ``dp-accounting``). Threat models: ``docs/PRIVACY.md``.
"""
