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
* **Compressed updates are decoded here**, as they arrive (``RoundReply.encoded`` says which
  codec made each): the rules and the privacy release only ever see float32 vectors.
* **Any call, the same rules.** :meth:`Federation.call_sites` calls one method on several sites
  and keeps what arrives before a deadline, with the same busy / down / late bookkeeping as a
  round: the key exchanges of secure aggregation (:mod:`actors.secure_round`) use it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from actors.contract import Personalize, RoundReply, SiteInfo, SiteJob, SiteModelReply
from actors.edge import spawn_edge
from cluster.console import Printer
from metalearn.aggregation import FlatUpdate
from metalearn.compression import decode
from metalearn.params import FlatLayout, Params
from privacy.messages import MaskedInput, ShareDelivery

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


def raised(err: BaseException) -> BaseException:
    """What the site itself raised, when Ray wrapped it (``RayTaskError.cause``)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


@dataclass
class RoundOutcome:
    """What came back from one round: updates that may be applied (or, under secure
    aggregation, masked inputs), a row per site, and what failed calls raised (Ray's wrapper
    removed)."""

    updates: list[FlatUpdate] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    masked: list[MaskedInput] = field(default_factory=list)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(1 for s in self.sites if s["status"] == status)


@dataclass
class StepOutcome:
    """What came back from one call to several sites (a step of secure aggregation).

    ``results``: each answer that arrived before the deadline, in the order the sites were
    given. ``rows``: for every other site, why not (``busy``, ``down``, ``late``, ``failed``,
    with ``error``). ``errors``: what a failed call raised (Ray's wrapper removed), so that the
    caller can tell a dropout from a protocol violation.
    """

    results: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    wall_s: float = 0.0


class Federation:
    """The edge actors; the late calls still running on them; the sites that are down.

    A site whose actor is unreachable (its node died, the actor is restarting) is *down*: it
    is not called again (a call to a restarting actor takes Ray over a second to refuse) but
    probed with a cheap ``info()`` call that each round checks without waiting; once a probe
    answers, the site is called again. A call of any kind that misses its deadline is
    cancelled and leaves its site *busy* until it ends.
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
                  deadline_s: float | None, clip_norm: float | None = None,
                  deliveries: Mapping[str, ShareDelivery] | None = None,
                  run_clock_s: float | None = None) -> RoundOutcome:
        """Call each participant with its devices, wait until all replied or the deadline.
        ``clip_norm``: the round's clipping bound under privacy (None: the sites' own).
        ``deliveries``: under secure aggregation, the shares routed to each participant; the
        replies then bring masked inputs (``RoundOutcome.masked``), never updates.
        ``run_clock_s``: the run's clock now, for sites that come and go (they leave when
        their on period ends)."""
        out = RoundOutcome()
        t0 = time.perf_counter()
        refs: dict[str, Any] = {}
        sent_at: dict[str, float] = {}
        for site, devices in participants.items():
            row = self._unavailable(site)
            if row is not None:
                out.sites.append(row)
                continue
            sent_at[site] = time.time()
            extra = () if deliveries is None else (deliveries[site],)
            clock = {} if run_clock_s is None else {"run_clock_s": run_clock_s}
            refs[site] = self.edges[site].round.remote(params_ref, round_idx, devices,
                                                       clip_norm, *extra, **clock)
        arrived: dict[str, FlatUpdate | MaskedInput] = {}

        def read(site: str, ref: Any, arrived_at: float) -> None:
            got = self._read(site, ref, round_idx, len(participants[site]), out,
                             sent_at[site], arrived_at)
            if got is not None:
                arrived[site] = got

        for site in self._collect(refs, round_idx, t0, deadline_s, read):
            out.sites.append({"site": site, "devices": len(participants[site]),
                              "status": "late", "error": f"past {deadline_s} s"})
        # Participant order, not arrival order: the aggregate's float sums are reproducible.
        ordered = [arrived[site] for site in participants if site in arrived]
        out.updates = [u for u in ordered if isinstance(u, FlatUpdate)]
        out.masked = [m for m in ordered if isinstance(m, MaskedInput)]
        out.wall_s = time.perf_counter() - t0
        out.sites.sort(key=lambda row: row["site"])
        return out

    def call_sites(self, method: str, args: Mapping[str, tuple[Any, ...]], round_idx: int,
                   deadline_s: float | None) -> StepOutcome:
        """Call ``method`` on each site of ``args`` with its arguments and keep what arrives
        before the deadline: the generic step of secure aggregation. Busy and down sites are
        not called; late calls are cancelled (their site is busy until they end); a site whose
        actor is gone is marked down, as in a round."""
        out = StepOutcome()
        t0 = time.perf_counter()
        refs: dict[str, Any] = {}
        for site, site_args in args.items():
            row = self._unavailable(site)
            if row is not None:
                out.rows[site] = row
                continue
            refs[site] = getattr(self.edges[site], method).remote(*site_args)
        arrived: dict[str, Any] = {}

        def read(site: str, ref: Any, arrived_at: float) -> None:
            try:
                arrived[site] = ray.get(ref)
            except Exception as err:  # the site raised, or its actor or node is gone
                out.errors[site] = raised(err)
                out.rows[site] = {"site": site, "status": "failed", "error": error_text(err)}
                self._note_gone(site, err, round_idx)

        for site in self._collect(refs, round_idx, t0, deadline_s, read):
            out.rows[site] = {"site": site, "status": "late", "error": f"past {deadline_s} s"}
        out.results = {site: arrived[site] for site in args if site in arrived}
        out.wall_s = time.perf_counter() - t0
        return out

    def call(self, site: str, params_ref: Any, call_id: int, devices: list[int],
             run_clock_s: float | None = None) -> Any | None:
        """One round call to ``site`` on its own (asynchronous rounds): its ref, or None when
        the site is busy or down. ``call_id`` is the round index the site samples tasks for."""
        if self._unavailable(site) is not None:
            return None
        clock = {} if run_clock_s is None else {"run_clock_s": run_clock_s}
        return self.edges[site].round.remote(params_ref, call_id, devices, None, **clock)

    def read(self, site: str, ref: Any, call_id: int, devices: int, out: RoundOutcome,
             sent_at: float) -> FlatUpdate | None:
        """Record a finished :meth:`call` in ``out.sites``; its decoded update, if it brought
        one (the same bookkeeping as a round's replies: failures, gone actors)."""
        got = self._read(site, ref, call_id, devices, out, sent_at, time.time())
        return got if isinstance(got, FlatUpdate) else None

    def _unavailable(self, site: str) -> dict[str, Any] | None:
        """The row of a site that cannot be called now (busy with a late call, or down)."""
        if self._busy(site):
            return {"site": site, "status": "busy",
                    "error": f"still running round {self.pending[site][0]}"}
        if self._down(site):
            return {"site": site, "status": "down",
                    "error": f"unreachable since round {self.probes[site][0]}"}
        return None

    def _collect(self, refs: Mapping[str, Any], round_idx: int, t0: float,
                 deadline_s: float | None, read: Callable[[str, Any, float], None]) -> list[str]:
        """``read(site, ref, arrived_at)`` for each call as it finishes (only the last one is
        read after the wait) until all are in or ``deadline_s`` after ``t0``; the late calls
        are cancelled and their sites marked busy. Returns the late sites."""
        site_of = {ref: site for site, ref in refs.items()}
        waiting = list(refs.values())
        end = None if deadline_s is None else t0 + deadline_s
        while waiting:
            left = None if end is None else max(0.0, end - time.perf_counter())
            done, waiting = ray.wait(waiting, num_returns=1, timeout=left)
            if not done:
                break
            read(site_of[done[0]], done[0], time.time())
        late = []
        for ref in waiting:
            site = site_of[ref]
            with contextlib.suppress(Exception):  # its actor may be gone already
                ray.cancel(ref)
            self.pending[site] = (round_idx, ref)
            late.append(site)
        return late

    def _note_gone(self, site: str, err: BaseException, round_idx: int) -> None:
        """Start probing a site whose actor became unreachable."""
        if isinstance(err, ray.exceptions.RayActorError):
            self.probes[site] = (round_idx, self.edges[site].info.remote())

    def _read(self, site: str, ref: Any, round_idx: int, devices: int, out: RoundOutcome,
              sent_at: float, arrived_at: float) -> FlatUpdate | MaskedInput | None:
        """Record one finished call in ``out.sites``; its update (or masked input), if it
        brought one."""
        row: dict[str, Any] = {"site": site, "devices": devices}
        try:
            reply: RoundReply = ray.get(ref)
        except Exception as err:  # the site raised, or its actor or node is gone
            out.sites.append({**row, "status": "failed", "error": error_text(err)})
            out.errors[site] = raised(err)
            self._note_gone(site, err, round_idx)
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
                          "local_steps": reply.local_steps, "idle_s": t.idle_s,
                          "network_s": t.network_s,
                          **({} if reply.clip_vote is None else {"clip_vote": reply.clip_vote}),
                          **reply.metrics})
        if reply.masked is not None:
            return reply.masked
        vector = reply.update if reply.encoded is None else decode(reply.encoded)
        return FlatUpdate(reply.kind, self.layout.vector(vector), reply.num_tasks,
                          reply.local_steps)

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

    def personalize(self, params: Params, ask: Personalize, echo: Printer,
                    ) -> tuple[list[dict[str, Any]], dict[str, SiteModelReply]]:
        """Each idle, reachable site's scores on its held-out tasks and its personalized model
        (:meth:`actors.edge.EdgeNode.personalize`): report rows (a failing site gets an
        ``error`` row) and the replies that carry a model, by site."""
        if ask.episodes <= 0 and ask.steps <= 0:
            return [], {}
        ref = ray.put(self.layout.pack(params))
        refs = {site: e.personalize.remote(ref, ask) for site, e in self.edges.items()
                if site not in self.pending and site not in self.probes}
        rows: list[dict[str, Any]] = []
        models: dict[str, SiteModelReply] = {}
        for site, r in refs.items():
            try:
                reply: SiteModelReply = ray.get(r)
            except Exception as err:
                rows.append({"site": site, "error": error_text(err)})
                echo(f"  {site}: personalization failed: {rows[-1]['error']}")
                continue
            if reply.params.size:
                models[site] = reply
            if reply.episodes:
                rows.append(personal_row(reply))
                echo(personal_line(rows[-1]))
        return rows, models


def personal_row(reply: SiteModelReply) -> dict[str, Any]:
    """A site's row of the personalization report: the meta-model's scores as ``before_*`` /
    ``after_*`` (as every run has recorded them) and its own model's as ``site_before_*`` /
    ``site_after_*``."""
    return {"site": reply.site, "round": reply.round, "episodes": reply.episodes,
            "steps": reply.test_steps, "personalize_steps": reply.steps,
            **dict(reply.global_scores),
            **{f"site_{k}": v for k, v in reply.personal_scores.items()},
            "seconds": reply.seconds}


def personal_line(row: Mapping[str, Any]) -> str:
    key = "accuracy" if "after_accuracy" in row else "mse"
    line = (f"  {row['site']}: held-out {key} {row[f'before_{key}']:.3f} before, "
            f"{row[f'after_{key}']:.3f} after {row['steps']} step(s)")
    if f"site_after_{key}" in row:
        line += f"; site model {row[f'site_after_{key}']:.3f} after {row['steps']}"
    return line
