"""The cloud's side of one secure-aggregation round across the sites, over Ray.

The protocol itself is :mod:`privacy` (pure, no Ray): :class:`~privacy.server.MaskingServer`
here, a :class:`~privacy.client.MaskingClient` in each site's actor
(:mod:`actors.edge`). This module runs its four exchanges as calls through the
:class:`~actors.federation.Federation`, each with a deadline, each leaving out the sites that are
busy, down, late or failing::

    advertise keys   secagg_advertise on the participants        -> server.collect_keys  (U1)
    share keys       secagg_share on U1                          -> server.route_shares  (U2)
    masked input     the round itself on U2, each with its shares -> server.collect_masked (U3)
    unmask           secagg_unmask on U3                          -> server.unmask -> the sum

A site that drops after sharing its keys is left out exactly (its pairwise masks are rebuilt
from the others' Shamir shares); one that drops after its masked input stays in the sum. What
the driver receives is public keys, sealed shares, masked ring vectors and shares of masks:
never an update (``tests/test_secagg_federated.py`` holds it to that).

Failures: too few sites at a step (or too few shares) is :class:`~privacy.errors.SecAggAbort`,
and the round is skipped, like a round below quorum. A :class:`~privacy.errors.ProtocolError`,
at the cloud or raised by a site, is a bug or a misbehaving party, never a dropout: it
propagates and stops the run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.federation import Federation, RoundOutcome, StepOutcome
from privacy.config import SecAggConfig
from privacy.errors import ProtocolError, SecAggAbort
from privacy.server import MaskingServer, SecAggResult

STEPS = ("advertise", "share", "unmask")


@dataclass
class SecureRound:
    """What one secure round produced: a row per participant (``outcome.sites``), the unmasked
    sum (None when the round was aborted or below quorum, ``abort`` says why), the time of each
    key exchange (calls and the cloud's work), and the protocol's own traffic (keys, sealed
    shares, unmasking; the masked inputs are the rows' ``bytes_up``)."""

    outcome: RoundOutcome
    result: SecAggResult | None = None
    abort: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0

    def fields(self) -> dict[str, Any]:
        """The round row's secure-aggregation columns."""
        dropped = 0 if self.result is None else len(self.result.dropped)
        return {**{f"secagg_{k}_s": v for k, v in self.phases.items()},
                "secagg_bytes_up": self.bytes_up, "secagg_bytes_down": self.bytes_down,
                "secagg_dropped": dropped,
                "secagg_survivors": 0 if self.result is None else len(self.result.survivors),
                "secagg_abort": self.abort or ""}


def run_secure_round(federation: Federation, config: SecAggConfig, site_ids: Mapping[str, int],
                     round_idx: int, participants: Mapping[str, list[int]], params_ref: Any, *,
                     deadline_s: float | None, step_deadline_s: float,
                     clip_norm: float | None, quorum: int) -> SecureRound:
    """One round of secure aggregation with ``participants`` (site -> its devices).

    ``config``: the round's settings (its ``clip`` is the round's bound, sent to each site with
    the keys call). ``deadline_s``: the round call's deadline; ``step_deadline_s``: each key
    exchange's. ``clip_norm``: the round's privacy clipping bound, for the round call, as
    without secure aggregation. ``quorum``: the fewest masked inputs worth unmasking.
    """
    server = MaskingServer(config, round_idx)
    out = SecureRound(RoundOutcome())
    left: dict[str, dict[str, Any]] = {}  # rows of sites that left in a key exchange
    names = {sid: site for site, sid in site_ids.items()}
    try:
        t0 = time.perf_counter()
        adverts = _step(federation, "advertise", {s: (round_idx, config.clip)
                                                  for s in participants},
                        round_idx, step_deadline_s, participants, left)
        roster = server.collect_keys(list(adverts.results.values()))
        u1 = [s for s in participants if s in adverts.results]
        out.bytes_up += sum(a.nbytes for a in adverts.results.values())
        out.bytes_down += roster.nbytes * len(u1)
        out.phases["advertise"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        bundles = _step(federation, "share", {s: (roster,) for s in u1}, round_idx,
                        step_deadline_s, participants, left)
        deliveries = server.route_shares(list(bundles.results.values()))
        u2 = [s for s in u1 if s in bundles.results]
        out.bytes_up += sum(b.nbytes for b in bundles.results.values())
        out.bytes_down += sum(d.nbytes for d in deliveries.values())
        out.phases["share"] = time.perf_counter() - t0

        out.outcome = federation.run_round(params_ref, round_idx, {s: participants[s] for s in u2},
                                           deadline_s, clip_norm,
                                           {s: deliveries[site_ids[s]] for s in u2})
        _refuse_protocol_errors(out.outcome.errors, "masked input", round_idx)
        masked = out.outcome.masked
        if len(masked) < quorum:
            out.abort = f"{len(masked)} masked input(s) arrived, quorum {quorum}"
            return out
        t0 = time.perf_counter()
        request = server.collect_masked(masked)
        out.phases["sum"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        u3 = [names[i] for i in request.survivors]
        out.bytes_down += request.nbytes * len(u3)
        responses = _step(federation, "unmask", {s: (round_idx, request) for s in u3},
                          round_idx, step_deadline_s, participants, None)
        _mark_unmask(out.outcome, responses)
        out.bytes_up += sum(r.nbytes for r in responses.results.values())
        out.result = server.unmask(list(responses.results.values()))
        out.phases["unmask"] = time.perf_counter() - t0
    except SecAggAbort as err:
        out.abort = str(err)
    finally:
        _complete_rows(out, participants, left)
    return out


def _step(federation: Federation, step: str, args: Mapping[str, tuple[Any, ...]],
          round_idx: int, deadline_s: float, participants: Mapping[str, Sequence[int]],
          left: dict[str, dict[str, Any]] | None) -> StepOutcome:
    """One key exchange; the sites that gave nothing are recorded in ``left`` (a row each)."""
    got = federation.call_sites(f"secagg_{step}", args, round_idx, deadline_s)
    _refuse_protocol_errors(got.errors, step, round_idx)
    if left is not None:
        for site, row in got.rows.items():
            left[site] = {**row, "devices": len(participants[site]), "secagg_step": step,
                          "error": f"secure aggregation {step}: {row.get('error', '')}"}
    return got


def _refuse_protocol_errors(errors: Mapping[str, BaseException], step: str,
                            round_idx: int) -> None:
    for site, err in errors.items():
        if isinstance(err, ProtocolError):
            raise ProtocolError(f"round {round_idx}, {step}: site {site} refused what the cloud "
                                f"sent: {err}") from err


def _mark_unmask(outcome: RoundOutcome, responses: StepOutcome) -> None:
    """A survivor that did not answer the unmasking stays in the sum (its input arrived); its
    row says so."""
    for row in outcome.sites:
        missing = responses.rows.get(row["site"])
        if missing is not None:
            row["secagg_unmask"] = missing["status"]


def _complete_rows(out: SecureRound, participants: Mapping[str, Sequence[int]],
                   left: Mapping[str, dict[str, Any]]) -> None:
    """One row per participant: the round's, the key exchange's it left in, or, for a site
    still in when the round was aborted before its round call, ``aborted``."""
    rows = {row["site"]: row for row in out.outcome.sites}
    for site in participants:
        if site in rows:
            continue
        rows[site] = left.get(site) or {"site": site, "devices": len(participants[site]),
                                        "status": "aborted", "error": out.abort or ""}
    out.outcome.sites = sorted(rows.values(), key=lambda row: row["site"])
