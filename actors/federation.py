"""The cloud's handle on its edge sites: start them, run a round across them, keep track of
the late and the dead, collect personalization reports, release them.

This is the cloud end of the wire whose edge end is :mod:`actors.edge` (as Flower keeps its
client proxy apart from its strategy): the driver (:mod:`experiments.federated`) decides *what*
a round does; this module does the Ray calls and turns what comes back into typed values.

Decisions worth knowing:

* **Stale results.** A late call is cancelled (``ray.cancel``; the actor checks the flag) and
  its site marked busy until the call ends. A site still busy is not called again, and a late
  result is dropped unread, so an update is only ever applied in the round it was computed for.
* **Dead sites.** A site whose actor became unreachable (its node died) is marked down and
  not called; a cheap probe call (``info()``) tells when its restarted actor
  (``max_restarts=-1``) is back, and from the next round on it takes part again.
* **Reads overlap the wait.** Each reply is read as it arrives (``ray.wait(num_returns=1)``
  until the deadline); updates are returned in participant order, so the aggregate's float
  sums do not depend on arrival order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from actors.contract import RoundReply, SiteInfo, SiteJob
from actors.edge import spawn_edge
from cluster.console import Printer
from metalearn.aggregation import FlatUpdate
from metalearn.params import FlatLayout, Params

STARTUP_TIMEOUT_S = 180.0
INLINE_BROADCAST_BYTES = 4 * 1024 * 1024


def broadcast(flat: np.ndarray, calls: int) -> Any:
    """What the round's calls carry: the flat parameters themselves, or one object ref.

    Small models go inline in each call (under ``max_direct_call_object_size``, which the
    connect helpers raise to 2 MiB): no object-store round trip on either side, measured
    ~1 ms less per round for the 453 KB conv net on 4 sites. Once the copies would add up
    (``INLINE_BROADCAST_BYTES`` over all calls), one ``ray.put`` that every site reads in
    place is cheaper. (On a cluster started without the 2 MiB setting, Ray stores each
    call's copy itself: correct, only slower.)
    """
    if flat.nbytes * calls <= INLINE_BROADCAST_BYTES:
        return flat
    return ray.put(flat)


def error_text(err: BaseException) -> str:
    """The last line of what a site raised (or why Ray could not reach it), for a row."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:500]


@dataclass
class RoundOutcome:
    """What came back from one round: updates that may be applied, and a row per site."""

    updates: list[FlatUpdate] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for s in self.sites if s["status"] == status)


class Federation:
    """The edge actors; the late calls still running on them; the sites that are down.

    A site whose actor is unreachable (its node died, the actor is restarting) is *down*: it
    is not called again (a call to a restarting actor takes Ray over a second to refuse) but
    probed with a cheap ``info()`` call that each round checks without waiting; once a probe
    answers, the site is called again.
    """

    def __init__(self, edges: Mapping[str, Any], layout: FlatLayout) -> None:
        self.edges = dict(edges)
        self.layout = layout  # checks the size of each site's flat update
        self.pending: dict[str, tuple[int, Any]] = {}  # site -> (round, ref) of a late call
        self.probes: dict[str, tuple[int, Any]] = {}  # site -> (round it went down, info ref)

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def start(cls, jobs: Mapping[str, SiteJob], actor_cpus: Mapping[str, float],
              layout: FlatLayout, echo: Printer) -> Federation:
        """One edge actor per job, each pinned to its site's node; returns once all have
        loaded their data and warmed up (or fails after ``STARTUP_TIMEOUT_S``)."""
        edges = {site: spawn_edge(job, actor_cpus[site]) for site, job in jobs.items()}
        try:
            infos: list[SiteInfo] = ray.get([e.info.remote() for e in edges.values()],
                                            timeout=STARTUP_TIMEOUT_S)
        except BaseException:
            for actor in edges.values():
                ray.kill(actor)
            raise
        for info in infos:
            echo(f"  {info.describe()}")
        return cls(edges, layout)

    def release(self) -> None:
        """Kill the edge actors (their processes and memory go at once) and forget them."""
        for actor in self.edges.values():
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.edges.clear()

    # ------------------------------------------------------------------ one round

    def run_round(self, params_ref: Any, round_idx: int, participants: Mapping[str, list[int]],
                  deadline_s: float | None, clip_norm: float | None = None) -> RoundOutcome:
        """Call each participant with its devices, wait until all replied or the deadline.
        ``clip_norm``: the round's clipping bound under privacy (None: the sites' own)."""
        out = RoundOutcome()
        t0 = time.perf_counter()
        refs: dict[str, Any] = {}
        sent_at: dict[str, float] = {}
        for site, devices in participants.items():
            if self._busy(site):
                out.sites.append({"site": site, "status": "busy",
                                  "error": f"still running round {self.pending[site][0]}"})
            elif self._down(site):
                out.sites.append({"site": site, "status": "down",
                                  "error": f"unreachable since round {self.probes[site][0]}"})
            else:
                sent_at[site] = time.time()
                refs[site] = self.edges[site].round.remote(params_ref, round_idx, devices,
                                                           clip_norm)
        # Read each reply as it arrives, so that only the last one is read after the wait.
        site_of = {ref: site for site, ref in refs.items()}
        waiting = list(refs.values())
        arrived: dict[str, FlatUpdate] = {}
        end = None if deadline_s is None else t0 + deadline_s
        while waiting:
            left = None if end is None else max(0.0, end - time.perf_counter())
            done, waiting = ray.wait(waiting, num_returns=1, timeout=left)
            if not done:
                break
            site = site_of[done[0]]
            update = self._read(site, done[0], round_idx, len(participants[site]), out,
                                sent_at[site], time.time())
            if update is not None:
                arrived[site] = update
        for ref in waiting:
            site = site_of[ref]
            with contextlib.suppress(Exception):  # its actor may be gone already
                ray.cancel(ref)
            self.pending[site] = (round_idx, ref)
            out.sites.append({"site": site, "devices": len(participants[site]),
                              "status": "late", "error": f"past {deadline_s} s"})
        # Participant order, not arrival order: the aggregate's float sums are reproducible.
        out.updates = [arrived[site] for site in participants if site in arrived]
        out.wall_s = time.perf_counter() - t0
        out.sites.sort(key=lambda row: row["site"])
        return out

    def _read(self, site: str, ref: Any, round_idx: int, devices: int, out: RoundOutcome,
              sent_at: float, arrived_at: float) -> FlatUpdate | None:
        """Record one finished call in ``out.sites``; its update, if it brought one."""
        row: dict[str, Any] = {"site": site, "devices": devices}
        try:
            reply: RoundReply = ray.get(ref)
        except Exception as err:  # the site raised, or its actor or node is gone
            out.sites.append({**row, "status": "failed", "error": error_text(err)})
            if isinstance(err, ray.exceptions.RayActorError):
                self.probes[site] = (round_idx, self.edges[site].info.remote())
            return None
        if reply.round != round_idx:  # cannot happen by construction; never apply it
            out.sites.append({**row, "status": "stale", "error": f"round {reply.round}"})
            return None
        t = reply.timings
        out.sites.append({**row, "status": "ok", "compute_s": t.compute_s,
                          "compute_wait_s": t.compute_wait_s,
                          "dispatch_s": t.started_at - sent_at,  # the call's delivery
                          "reply_s": arrived_at - t.finished_at,  # and its reply
                          "num_tasks": reply.num_tasks, "bytes_up": reply.bytes_up,
                          **({} if reply.clip_vote is None else {"clip_vote": reply.clip_vote}),
                          **reply.metrics})
        return FlatUpdate(reply.kind, self.layout.vector(reply.update), reply.num_tasks)

    def _busy(self, site: str) -> bool:
        if site not in self.pending:
            return False
        _, ref = self.pending[site]
        done, _ = ray.wait([ref], timeout=0)
        if done:
            del self.pending[site]  # its result belongs to an old round: dropped unread
        return not done

    def _down(self, site: str) -> bool:
        if site not in self.probes:
            return False
        since, ref = self.probes[site]
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            return True
        try:
            ray.get(ref)
        except Exception:  # still unreachable: probe again
            self.probes[site] = (since, self.edges[site].info.remote())
            return True
        del self.probes[site]
        return False

    # ------------------------------------------------------------------ state and reports

    def sampler_states(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Each reachable, idle site's sampler state. A site that is down or still busy is
        left out: its tasks are seeded per round, so the state is bookkeeping, not needed to
        resume."""
        refs = {s: e.sampler_state.remote() for s, e in self.edges.items()
                if s not in self.pending and s not in self.probes}
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        out = {}
        for site, ref in refs.items():
            if ref in set(done):
                with contextlib.suppress(Exception):  # a site that just died: nothing to save
                    out[site] = ray.get(ref)
        return out

    def load_sampler_states(self, states: Mapping[str, Any]) -> None:
        ray.get([self.edges[s].load_sampler_state.remote(state)
                 for s, state in states.items() if s in self.edges])

    def personalize(self, params: Params, episodes: int, echo: Printer) -> list[dict[str, Any]]:
        """Each site's held-out tasks before and after adaptation; a failing site is reported."""
        if episodes <= 0:
            return []
        ref = ray.put(params)
        refs = {site: e.personalize.remote(ref, episodes) for site, e in self.edges.items()}
        rows = []
        for site, r in refs.items():
            try:
                rows.append(ray.get(r))
            except Exception as err:
                rows.append({"site": site, "error": error_text(err)})
        for row in rows:
            if "error" in row:
                echo(f"  {row['site']}: personalization failed: {row['error']}")
                continue
            key = "accuracy" if "after_accuracy" in row else "mse"
            echo(f"  {row['site']}: held-out {key} {row[f'before_{key}']:.3f} before, "
                 f"{row[f'after_{key}']:.3f} after {row['steps']} step(s)")
        return rows
