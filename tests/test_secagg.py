"""Secure aggregation (privacy/): fixed point, Shamir sharing, the neighbour graph, and the
four-step protocol with dropouts, as plain objects (no Ray)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import numpy as np
import pytest

from privacy.client import MaskingClient
from privacy.config import SecAggConfig, majority_threshold
from privacy.errors import ProtocolError, SecAggAbort
from privacy.fixed_point import FixedPoint, Ring, clip_l2
from privacy.graph import neighbour_graph, secagg_plus_degree
from privacy.keys import load_private, pair_mask_key, self_mask_key
from privacy.messages import MaskedInput, SealedShares, ShareDelivery, UnmaskRequest
from privacy.prg import MaskStream
from privacy.server import MaskingServer, SecAggResult
from privacy.shamir import PRIME, Share, evaluate, interpolate, reconstruct, split


def config(n: int, dim: int = 64, *, clip: float = 1.0, bits: int = 32, t: int | None = None,
           neighbours: int | None = None) -> SecAggConfig:
    return SecAggConfig(dim=dim, clip=clip, bits=bits, max_participants=n,
                        threshold=majority_threshold(n) if t is None else t,
                        neighbours=neighbours)


def updates(cfg: SecAggConfig, sites: Collection[int], seed: int = 0) -> dict[int, np.ndarray]:
    """Random float32 updates, each clipped to the bound (most at it, a few well inside)."""
    rng = np.random.default_rng(seed)
    out = {}
    for u in sites:
        x = clip_l2(rng.normal(size=cfg.dim) * rng.uniform(0.01, 3.0), cfg.clip)
        out[u] = x.astype(np.float32)
    return out


@dataclass
class Round:
    """One protocol round driven in process, with the messages the cloud saw."""

    cfg: SecAggConfig
    server: MaskingServer
    clients: dict[int, MaskingClient]
    masked: dict[int, MaskedInput]
    result: SecAggResult


def run_round(cfg: SecAggConfig, xs: Mapping[int, np.ndarray], *, round_idx: int = 3,
              skip_keys: Collection[int] = (), skip_shares: Collection[int] = (),
              skip_masked: Collection[int] = (), skip_unmask: Collection[int] = ()) -> Round:
    """Each ``skip_*`` lists the sites that drop just before that step."""
    server = MaskingServer(cfg, round_idx)
    clients = {u: MaskingClient(u, cfg, round_idx) for u in xs}
    alive = [u for u in xs if u not in skip_keys]
    roster = server.collect_keys([clients[u].advertise_keys() for u in alive])
    alive = [u for u in alive if u not in skip_shares]
    deliveries = server.route_shares([clients[u].share_keys(roster) for u in alive])
    alive = [u for u in alive if u not in skip_masked]
    masked = {u: clients[u].masked_input(xs[u], deliveries[u]) for u in alive}
    request = server.collect_masked(list(masked.values()))
    alive = [u for u in alive if u not in skip_unmask]
    result = server.unmask([clients[u].unmask(request) for u in alive])
    return Round(cfg, server, clients, masked, result)


def plain_sum(xs: Mapping[int, np.ndarray], sites: Collection[int]) -> np.ndarray:
    return np.sum([xs[u].astype(np.float64) for u in sites], axis=0)


# --------------------------------------------------------------------------- fixed point

@pytest.mark.parametrize("bits", [16, 24, 32, 48, 64])
def test_fixed_point_sum_is_exact_within_the_documented_bound(bits: int) -> None:
    n, dim, clip = 8, 2000, 2.5
    fp = FixedPoint(clip, n, bits)
    xs = updates(config(n, dim, clip=clip), range(1, n + 1))
    total = fp.ring.zeros(dim)
    for x in xs.values():
        fp.ring.add_(total, fp.encode(x, dim))
    fp.ring.reduce(total)
    err = np.abs(fp.decode(total) - plain_sum(xs, xs)).max()
    assert err <= fp.error_bound()
    # the bound is half a quantization step per summand (plus float64 rounding), no more
    assert fp.error_bound() == pytest.approx(n / (2 * fp.scale) + n * clip * 2.0 ** -50)
    if bits == 32:
        assert fp.error_bound() < 1e-7 * n * clip  # 32 bits: ~2^-31 of the sum's range


def test_the_ring_is_sized_so_the_worst_sum_cannot_wrap() -> None:
    n, clip = 16, 1.0
    fp = FixedPoint(clip, n, 32)
    for worst in ([clip, 0.0], [0.0, -clip]):  # every site at the bound, on one coordinate
        total = fp.ring.zeros(2)
        for _ in range(n):
            fp.ring.add_(total, fp.encode(worst))
        fp.ring.reduce(total)
        np.testing.assert_allclose(fp.decode(total), n * np.array(worst), rtol=0,
                                   atol=fp.error_bound())
    # the same n encodings in a ring sized for n/2 sites wrap around: sizing is what saves it
    small = FixedPoint(clip, n // 2, 32)
    wrapped = small.ring.zeros(2)
    for _ in range(n):
        small.ring.add_(wrapped, small.encode([clip, 0.0]))
    assert abs(small.decode(wrapped)[0] - n * clip) > 1.0


def test_scale_follows_clip_participants_and_bits() -> None:
    a = FixedPoint(1.0, 10, 32)
    assert a.scale == pytest.approx(2.0 ** 31 / 10, rel=1e-6)
    assert FixedPoint(0.5, 10, 32).scale == pytest.approx(2 * a.scale)
    assert FixedPoint(1.0, 20, 32).scale == pytest.approx(a.scale / 2, rel=1e-6)
    assert FixedPoint(1.0, 10, 40).scale == pytest.approx(256 * a.scale, rel=1e-6)
    assert Ring(32).dtype == np.uint32 and Ring(33).dtype == np.uint64


def test_fixed_point_rejects_bad_inputs_clearly() -> None:
    fp = FixedPoint(1.0, 4, 32)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fp.encode([0.1, float("nan")])
    with pytest.raises(ValueError, match="exceeds the clip bound"):
        fp.encode([1.0, 1.0])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        fp.encode([0.1, 0.1], dim=3)
    with pytest.raises(ValueError, match="1-D"):
        fp.encode(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="ring bits"):
        FixedPoint(1.0, 4, 65)
    with pytest.raises(ValueError, match="fewer than 8 bits"):
        FixedPoint(1.0, 1000, 16)
    with pytest.raises(ValueError, match="positive"):
        FixedPoint(0.0, 4, 32)
    np.testing.assert_allclose(np.linalg.norm(clip_l2([3.0, 4.0], 1.0)), 1.0)
    np.testing.assert_array_equal(clip_l2([0.3, 0.4], 1.0), [0.3, 0.4])


# --------------------------------------------------------------------------- Shamir

def test_any_t_shares_reconstruct_the_secret() -> None:
    secret = bytes(range(32))
    shares = split(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares.values(), 3):
        assert reconstruct(list(subset), 3, 32) == secret
    assert reconstruct(list(shares.values()), 3, 32) == secret  # extra shares are checked
    max_secret = b"\xff" * 32
    assert reconstruct(list(split(max_secret, 2, [7, 9]).values()), 2, 32) == max_secret


def test_fewer_than_t_shares_cannot_reconstruct() -> None:
    shares = list(split(b"\x01" * 32, 4, range(1, 8)).values())
    with pytest.raises(ValueError, match="cannot reconstruct"):
        reconstruct(shares[:3], 4, 32)
    # pretending the threshold is lower yields garbage, not the secret
    with pytest.raises(ValueError, match="does not fit"):
        reconstruct(shares[:3], 3, 32)


def test_t_minus_one_shares_fit_every_secret_equally_exhaustive_small_field() -> None:
    """Over GF(11), t = 3: for each possible pair of shares (holders 1 and 2), every secret
    is the constant term of exactly one consistent polynomial, so the shares carry no
    information about the secret."""
    p, t, holders = 11, 3, (1, 2)
    seen: dict[tuple[int, ...], Counter[int]] = {}
    for coeffs in itertools.product(range(p), repeat=t):
        ys = tuple(evaluate(coeffs, x, p) for x in holders)
        seen.setdefault(ys, Counter())[coeffs[0]] += 1
    assert len(seen) == p ** (t - 1)
    for secrets_seen in seen.values():
        assert secrets_seen == Counter({s: 1 for s in range(p)})


def test_t_minus_one_shares_admit_two_different_secrets() -> None:
    """In the real field: fix t - 1 shares of secret A; secret B (and A) each admit a
    polynomial of degree < t through them, so they cannot tell A from B."""
    t = 4
    a, b = b"A" * 32, b"B" * 32
    shares = split(a, t, range(1, 8))
    known = [shares[x] for x in (2, 5, 7)]  # t - 1 of them
    for candidate in (a, b):
        points = [Share(0, int.from_bytes(candidate, "big")), *known]
        for s in known:  # the polynomial through (0, candidate) and the shares passes them all
            assert interpolate(points, s.x) == s.y
        assert interpolate(points, 0) == int.from_bytes(candidate, "big")
    assert reconstruct([*known, shares[1]], t, 32) == a  # one more share decides


def test_shamir_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="distinct"):
        split(b"x" * 32, 2, [1, 1, 2])
    with pytest.raises(ValueError, match=r"\[1, prime\)"):
        split(b"x" * 32, 2, [0, 1, 2])
    with pytest.raises(ValueError, match="threshold"):
        split(b"x" * 32, 4, [1, 2, 3])
    with pytest.raises(ValueError, match="does not fit"):
        split(b"\xff" * 66, 2, [1, 2])
    shares = list(split(b"y" * 32, 2, [1, 2, 3]).values())
    bad = [*shares[:2], Share(shares[2].x, shares[2].y + 1)]
    with pytest.raises(ValueError, match="inconsistent"):
        reconstruct(bad, 2, 32)
    assert PRIME == 2 ** 521 - 1


# --------------------------------------------------------------------------- graph

def test_neighbour_graph_complete_and_secagg_plus() -> None:
    sites = list(range(1, 41))
    complete = neighbour_graph(sites, None, b"s")
    assert all(complete[u] == set(sites) - {u} for u in sites)
    assert neighbour_graph(sites[:5], 8, b"s") == neighbour_graph(sites[:5], None, b"s")
    k = secagg_plus_degree(len(sites))
    assert k == 12
    g = neighbour_graph(sites, k, b"session-1")
    assert all(len(g[u]) == k and u not in g[u] for u in sites)
    assert all(u in g[v] for u in sites for v in g[u])  # symmetric: masks cancel
    assert g == neighbour_graph(sites, k, b"session-1")  # every party computes the same
    assert g != neighbour_graph(sites, k, b"session-2")  # shuffled anew each round
    reach, frontier = {1}, [1]  # connected
    while frontier:
        nxt = [v for u in frontier for v in g[u] if v not in reach]
        reach.update(nxt)
        frontier = nxt
    assert reach == set(sites)
    with pytest.raises(ValueError, match="even"):
        neighbour_graph(sites, 3, b"s")


# --------------------------------------------------------------------------- the protocol

@pytest.mark.parametrize(("n", "neighbours", "t", "bits"), [
    (3, None, 2, 32), (6, None, 4, 32), (6, None, 4, 64), (5, None, 3, 20), (16, 4, 3, 32)])
def test_unmasked_sum_equals_plain_sum(n: int, neighbours: int | None, t: int, bits: int
                                       ) -> None:
    cfg = config(n, 300, clip=3.0, bits=bits, t=t, neighbours=neighbours)
    xs = updates(cfg, range(1, n + 1), seed=n)
    r = run_round(cfg, xs)
    assert r.result.survivors == tuple(range(1, n + 1)) and r.result.dropped == ()
    err = np.abs(r.result.total - plain_sum(xs, xs)).max()
    assert err <= r.result.error_bound == r.cfg.fixed_point.error_bound(n)
    np.testing.assert_allclose(r.result.mean(), plain_sum(xs, xs) / n, rtol=0,
                               atol=r.result.error_bound / n)


@pytest.mark.parametrize("neighbours", [None, 8])
@pytest.mark.parametrize("when", ["keys", "shares", "masked", "unmask", "all"])
def test_dropouts_are_recovered_and_the_rest_sums_exactly(when: str, neighbours: int | None
                                                          ) -> None:
    n = 20  # SecAgg+: 9 holders per site, 6 sites gone at most, so t = 3 always remain
    cfg = config(n, 200, t=3 if neighbours else 5, neighbours=neighbours)
    xs = updates(cfg, range(1, n + 1), seed=1)
    skips = {"keys": {2}, "shares": {4}, "masked": {6, 7}, "unmask": {9, 10}}
    kwargs = {f"skip_{k}": v for k, v in skips.items() if when in (k, "all")}
    r = run_round(cfg, xs, **kwargs)
    # a site that dropped before sending its input is out of the sum; one that dropped
    # after sending it (before unmasking) is in it
    gone = set().union(*(v for k, v in skips.items() if k != "unmask" and when in (k, "all")))
    summed = [u for u in xs if u not in gone]
    assert r.result.survivors == tuple(summed)
    expected_dropped = {6, 7} if when in ("masked", "all") else set()
    assert set(r.result.dropped) == expected_dropped
    err = np.abs(r.result.total - plain_sum(xs, summed)).max()
    assert err <= r.result.error_bound


def test_secagg_plus_sends_shares_to_neighbours_only() -> None:
    n, k = 30, 6
    cfg = config(n, 16, t=4, neighbours=k)
    server = MaskingServer(cfg, 0)
    clients = {u: MaskingClient(u, cfg, 0) for u in range(1, n + 1)}
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    bundles = [c.share_keys(roster) for c in clients.values()]
    assert all(len(b.sealed) == k for b in bundles)
    full = config(n, 16, t=4)
    s2 = MaskingServer(full, 0)
    c2 = MaskingClient(1, full, 0)
    others = [MaskingClient(u, full, 0).advertise_keys() for u in range(2, n + 1)]
    roster2 = s2.collect_keys([c2.advertise_keys(), *others])
    assert len(c2.share_keys(roster2).sealed) == n - 1


def test_masked_input_is_independent_of_the_update_across_trials() -> None:
    """What the cloud receives from one site, over many rounds, does not correlate with that
    site's update: |r| stays below 4 / sqrt(samples) (r ~ N(0, 1/samples) at chance)."""
    trials, n, dim = 250, 3, 4
    cfg = config(n, dim, t=2)
    true, seen = [], []
    rng = np.random.default_rng(5)
    for trial in range(trials):
        xs = {u: clip_l2(rng.uniform(-1, 1, size=dim), 1.0) for u in range(1, n + 1)}
        r = run_round(cfg, xs, round_idx=trial)
        true.append(xs[1])
        seen.append(r.masked[1].vector / 2.0 ** cfg.bits)  # a ring element as a real in [0, 1)
    x, y = np.concatenate(true), np.concatenate(seen)
    corr = np.corrcoef(x, y)[0, 1]
    assert abs(corr) < 4 / np.sqrt(x.size)
    assert abs(y.mean() - 0.5) < 4 * np.sqrt(1 / 12 / y.size)  # uniform on the ring


def test_masked_input_is_independent_of_the_update_across_coordinates() -> None:
    n, dim = 4, 20_000
    cfg = config(n, dim, t=3)
    ramp = np.linspace(-1, 1, dim)
    xs = {u: clip_l2(ramp * (u + 1), 1.0) for u in range(1, n + 1)}  # very structured
    r = run_round(cfg, xs)
    fp = cfg.fixed_point
    for u in xs:
        y = fp.ring.to_signed(r.masked[u].vector).astype(np.float64)
        assert abs(np.corrcoef(xs[u], y)[0, 1]) < 4 / np.sqrt(dim)
        # the control: the same statistic sees the update once its masks are gone
        assert np.corrcoef(xs[u], fp.decode(fp.encode(xs[u])))[0, 1] > 0.999


def test_a_late_site_declared_dropped_stays_hidden_by_its_self_mask() -> None:
    """Site 3's input is late: the cloud counts it as dropped and, in unmasking, rebuilds its
    mask key (to cancel the pairwise masks). When the late input then arrives, stripping all
    its pairwise masks still leaves it uniformly random: the self mask (whose seed no site
    reveals for a dropped site) hides the update."""
    n, dim, late = 5, 5000, 3
    cfg = config(n, dim, t=3)
    xs = updates(cfg, range(1, n + 1), seed=9)
    server = MaskingServer(cfg, 11)
    clients = {u: MaskingClient(u, cfg, 11) for u in xs}
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    deliveries = server.route_shares([c.share_keys(roster) for c in clients.values()])
    on_time = [u for u in xs if u != late]
    request = server.collect_masked([clients[u].masked_input(xs[u], deliveries[u])
                                     for u in on_time])
    responses = [clients[u].unmask(request) for u in on_time]
    result = server.unmask(responses)
    assert result.dropped == (late,)
    assert np.abs(result.total - plain_sum(xs, on_time)).max() <= result.error_bound
    late_input = clients[late].masked_input(xs[late], deliveries[late]).vector
    # everything the cloud now knows about site 3: its mask key, from t of the key shares
    key_shares = [r.key_shares[late] for r in responses][: cfg.threshold]
    private = load_private(reconstruct(key_shares, cfg.threshold, 32))
    fp, ring, stream = cfg.fixed_point, cfg.fixed_point.ring, MaskStream(cfg.fixed_point.ring, dim)
    stripped = late_input.copy()
    for u in on_time:
        m = stream.mask(pair_mask_key(private, roster.adverts[u - 1].mask_public, roster.session,
                                      11, late, u))
        if late < u:
            ring.sub_(stripped, m)
        else:
            ring.add_(stripped, m)
    ring.reduce(stripped)
    assert abs(np.corrcoef(xs[late], ring.to_signed(stripped))[0, 1]) < 4 / np.sqrt(dim)
    # no response carried a share of site 3's self-mask seed
    assert all(late not in r.seed_shares for r in responses)
    # control: with the self-mask seed as well (which the cloud never gets) it would decode
    seed_key = self_mask_key(clients[late]._seed, roster.session, 11, late)
    ring.sub_(stripped, stream.mask(seed_key))
    ring.reduce(stripped)
    assert np.abs(fp.decode(stripped) - xs[late]).max() <= fp.error_bound(1)


def test_no_site_reveals_both_secrets_of_one_site() -> None:
    cfg = config(7, 8, t=4)
    xs = updates(cfg, range(1, 8))
    server = MaskingServer(cfg, 0)
    clients = {u: MaskingClient(u, cfg, 0) for u in xs}
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    deliveries = server.route_shares([c.share_keys(roster) for c in clients.values()])
    request = server.collect_masked([clients[u].masked_input(xs[u], deliveries[u])
                                     for u in range(1, 6)])
    for u in range(1, 6):
        r = clients[u].unmask(request)
        assert set(r.seed_shares) == set(range(1, 6)) and set(r.key_shares) == {6, 7}
        assert not set(r.seed_shares) & set(r.key_shares)


# --------------------------------------------------------------------------- too few left

def test_too_few_sites_abort_at_every_step() -> None:
    cfg = config(6, 8, t=4)
    xs = updates(cfg, range(1, 7))
    with pytest.raises(SecAggAbort, match="advertised keys"):
        run_round(cfg, xs, skip_keys={1, 2, 3})
    with pytest.raises(SecAggAbort, match="shared keys"):
        run_round(cfg, xs, skip_shares={1, 2, 3})
    with pytest.raises(SecAggAbort, match="masked input"):
        run_round(cfg, xs, skip_masked={1, 2, 3})
    with pytest.raises(SecAggAbort, match="fewer than t=4 shares"):
        run_round(cfg, xs, skip_unmask={1, 2, 3})


def test_secagg_plus_aborts_when_a_neighbourhood_is_gone() -> None:
    n = 12
    cfg = config(n, 8, t=3, neighbours=4)
    xs = updates(cfg, range(1, n + 1))
    server = MaskingServer(cfg, 0, session=b"fixed-session-16")
    clients = {u: MaskingClient(u, cfg, 0) for u in xs}
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    deliveries = server.route_shares([c.share_keys(roster) for c in clients.values()])
    request = server.collect_masked([clients[u].masked_input(xs[u], deliveries[u]) for u in xs])
    graph = neighbour_graph(list(xs), 4, b"fixed-session-16")
    silent = graph[1] | {1}  # site 1 and all its neighbours go quiet before unmasking
    with pytest.raises(SecAggAbort, match="self-mask seed of site 1 "):
        server.unmask([clients[u].unmask(request) for u in xs if u not in silent])


# --------------------------------------------------------------------------- wrong inputs

def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="threshold"):
        config(4, t=5)
    with pytest.raises(ValueError, match="threshold"):
        config(20, t=6, neighbours=4)
    with pytest.raises(ValueError, match="even"):
        config(20, t=2, neighbours=3)
    with pytest.raises(ValueError, match="at least 2"):
        config(1, t=1)
    with pytest.raises(ValueError, match="fewer than 8 bits"):
        config(1000, bits=16, t=3)
    with pytest.raises(ValueError, match="clip"):
        config(4, clip=float("inf"))
    assert majority_threshold(10) == 6


def test_a_bad_update_is_refused_and_the_site_can_retry() -> None:
    cfg = config(3, 10, t=2)
    server = MaskingServer(cfg, 0)
    clients = {u: MaskingClient(u, cfg, 0) for u in (1, 2, 3)}
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    deliveries = server.route_shares([c.share_keys(roster) for c in clients.values()])
    c = clients[1]
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        c.masked_input(np.zeros(11), deliveries[1])
    with pytest.raises(ValueError, match="NaN"):
        c.masked_input(np.full(10, np.nan), deliveries[1])
    with pytest.raises(ValueError, match="clip bound"):
        c.masked_input(np.ones(10), deliveries[1])
    with pytest.raises(ProtocolError, match="delivered to 1"):
        c.masked_input(np.zeros(10), deliveries[2])
    assert c.masked_input(np.zeros(10), deliveries[1]).vector.dtype == np.uint32


def test_steps_out_of_order_and_replays_are_protocol_errors() -> None:
    cfg = config(3, 4, t=2)
    xs = updates(cfg, (1, 2, 3))
    server = MaskingServer(cfg, 0)
    clients = {u: MaskingClient(u, cfg, 0) for u in xs}
    with pytest.raises(ProtocolError, match="step 2"):
        server.route_shares([])
    with pytest.raises(ProtocolError, match="step 2"):
        clients[1].share_keys(None)  # type: ignore[arg-type]
    adverts = [c.advertise_keys() for c in clients.values()]
    with pytest.raises(ProtocolError, match="step 1"):
        clients[1].advertise_keys()
    with pytest.raises(ProtocolError, match="twice"):
        MaskingServer(cfg, 0).collect_keys([adverts[0], adverts[0], adverts[1]])
    roster = server.collect_keys(adverts)
    other_round = MaskingClient(1, cfg, 1)
    other_round.advertise_keys()
    with pytest.raises(ProtocolError, match="round 0 sent to round 1"):
        other_round.share_keys(roster)
    stranger = MaskingClient(1, cfg, 0)
    stranger.advertise_keys()
    with pytest.raises(ProtocolError, match="own keys"):
        stranger.share_keys(roster)
    deliveries = server.route_shares([c.share_keys(roster) for c in clients.values()])
    masked = [clients[u].masked_input(xs[u], deliveries[u]) for u in xs]
    with pytest.raises(ProtocolError, match="sent twice"):
        server.collect_masked([masked[0], masked[0]])
    request = server.collect_masked(masked)
    clients[1].unmask(request)
    with pytest.raises(ProtocolError, match="step 4"):
        clients[1].unmask(request)  # a second request is refused, whatever it says
    with pytest.raises(ProtocolError, match="not among the survivors"):
        clients[2].unmask(UnmaskRequest((1, 3)))
    with pytest.raises(ProtocolError, match="never shared keys"):
        clients[2].unmask(UnmaskRequest((1, 2, 3, 9)))


def test_tampered_or_misrouted_shares_are_detected() -> None:
    cfg = config(3, 4, t=2)
    server = MaskingServer(cfg, 0)
    clients = {u: MaskingClient(u, cfg, 0) for u in (1, 2, 3)}
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    deliveries = server.route_shares([c.share_keys(roster) for c in clients.values()])
    d = deliveries[1]
    first = d.sealed[0]
    flipped = bytearray(first.blob)
    flipped[-1] ^= 1
    tampered = replace(d, sealed=(SealedShares(first.sender, 1, bytes(flipped)), *d.sealed[1:]))
    with pytest.raises(ProtocolError, match="failed authentication"):
        clients[1].masked_input(np.zeros(4), tampered)
    # site 2's share for site 3, handed to site 1 as if it were its own
    for_three = next(s for s in deliveries[3].sealed if s.sender == 2)
    swapped = ShareDelivery(1, d.senders, (SealedShares(2, 1, for_three.blob),
                                           *[s for s in d.sealed if s.sender != 2]))
    with pytest.raises(ProtocolError, match="failed authentication"):
        clients[1].masked_input(np.zeros(4), swapped)
    with pytest.raises(ProtocolError, match="expected one from each"):
        clients[1].masked_input(np.zeros(4), replace(d, sealed=d.sealed[:1]))


def test_bad_masked_vectors_and_corrupted_unmask_shares_are_refused() -> None:
    cfg = config(4, 6, bits=20, t=3)
    xs = updates(cfg, (1, 2, 3, 4))
    server = MaskingServer(cfg, 0)
    clients = {u: MaskingClient(u, cfg, 0) for u in xs}
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    deliveries = server.route_shares([c.share_keys(roster) for c in clients.values()])
    masked = [clients[u].masked_input(xs[u], deliveries[u]) for u in (1, 2, 3)]
    with pytest.raises(ValueError, match="expected uint32"):
        server.collect_masked([MaskedInput(1, masked[0].vector.astype(np.int64))])
    with pytest.raises(ValueError, match="outside Z_2"):
        server.collect_masked([MaskedInput(1, np.full(6, 2 ** 20, np.uint32))])
    request = server.collect_masked(masked)
    responses = [clients[u].unmask(request) for u in (1, 2, 3)]
    # site 3's share of the dropped site 4's key, altered in transit
    r = responses[2]
    bad = {4: Share(r.key_shares[4].x, r.key_shares[4].y ^ 1)}
    with pytest.raises(ProtocolError, match="mask key rebuilt for site 4 does not match"):
        server.unmask([*responses[:2], replace(r, key_shares=bad)])


def test_a_stale_share_from_another_round_does_not_open() -> None:
    cfg = config(3, 4, t=2)
    rounds = []
    for idx in (0, 1):
        server = MaskingServer(cfg, idx)
        clients = {u: MaskingClient(u, cfg, idx) for u in (1, 2, 3)}
        roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
        rounds.append((clients, server.route_shares([c.share_keys(roster)
                                                     for c in clients.values()])))
    (_, old), (new_clients, _) = rounds
    with pytest.raises(ProtocolError, match="failed authentication"):
        new_clients[1].masked_input(np.zeros(4), old[1])
