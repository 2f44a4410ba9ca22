"""Ray settings that edgemeta applies on purpose, each with the reason it was chosen.

One place, so the embedded cluster (:mod:`cluster.connect`), the local launcher
(:mod:`cluster.local`) and ``cluster.yaml`` cannot drift apart: a test compares
``cluster.yaml``'s head command with :data:`RAY_SYSTEM_CONFIG`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: Ray settings that every edgemeta cluster starts with: the embedded one, the local
#: launcher's head (``--system-config``) and ``cluster.yaml``'s head. Why: a site's update is
#: parameter-sized (450 KB for the Omniglot conv net), over Ray's 100 KB default for returning
#: a value inside the call's reply; inline, it skips a put into the site node's object store
#: and the driver's pull from it, a few ms of a 4-site round here (docs/BENCHMARKS.md).
#: Read-only: ``ray.init`` adds its session's spilling settings to the dict it is given, so
#: each use passes a copy.
RAY_SYSTEM_CONFIG: Mapping[str, int] = MappingProxyType(
    {"max_direct_call_object_size": 2 * 1024 * 1024})

#: How soon the GCS of a local cluster (``edgemeta cluster up``: every node on this machine)
#: declares a node dead: a SIGKILLed raylet refuses the check at once, so after about
#: ``failure_threshold`` x ``period`` = 3 s (Ray's defaults: 12-16 s measured here, which left
#: ``cluster status`` showing a dead site alive). The 2 s timeout only matters for a raylet that
#: hangs; it tolerates a loaded host (checks answered in over 500 ms were seen at load 40 on 2
#: cores). Only the local launcher's head applies it: across a WAN (``cluster.yaml``) a site
#: may miss a few seconds of checks without being gone, so Ray's defaults stay there.
LOCAL_HEALTH_CHECK_CONFIG: Mapping[str, int] = MappingProxyType({
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 3,
})

#: Faster failure detection, for fault tests and the demo: with Ray's defaults the GCS declares
#: a SIGKILLed raylet dead after ~15-18 s; with these, after ~2-3 s. Environment variables of
#: every node: pass as ``cluster.local.up(..., env=...)``.
FAST_HEALTH_CHECK_ENV: Mapping[str, str] = MappingProxyType({
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
})
