"""The topology file: what it accepts, and how clearly it says what it rejects."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.topology import (
    ACTOR_RESOURCE_REQUEST,
    CLOUD_RESOURCE,
    SITE_RESOURCE_QUANTITY,
    Topology,
    TopologyError,
    load_topology,
    parse_topology,
    site_resource,
    uniform_topology,
)

REPO = Path(__file__).resolve().parents[1]


def _error(raw: object) -> str:
    with pytest.raises(TopologyError) as info:
        parse_topology(raw, "t.yaml")
    return str(info.value)


def test_bundled_local4_loads() -> None:
    topo = load_topology(REPO / "cluster" / "topologies" / "local4.yaml")
    assert topo.site_names == ["site-0", "site-1", "site-2", "site-3"]
    assert topo.site("site-3").delay_s == 0.5
    assert topo.cloud.memory_gb == 2.0


def test_unknown_key_is_named_with_its_path() -> None:
    msg = _error({"sites": [{"name": "a", "bogus": 1}]})
    assert "t.yaml" in msg and "sites.0.bogus: unknown key" in msg
    assert "cluster: unknown key" in _error({"cluster": 1, "sites": [{"name": "a"}]})


def test_duplicate_site_names() -> None:
    msg = _error({"sites": [{"name": "a"}, {"name": "b"}, {"name": "a"}]})
    assert "site names must be distinct" in msg and "['a']" in msg
    assert "Value error" not in msg


@pytest.mark.parametrize("name", ["Bad_Name", "-lead", "has space", "x" * 42, ""])
def test_bad_site_name(name: str) -> None:
    msg = _error({"sites": [{"name": name}]})
    assert "sites.0.name" in msg and "pattern" in msg


def test_actor_cpus_above_node_cpus() -> None:
    msg = _error({"sites": [{"name": "a", "num_cpus": 1, "actor_cpus": 2}]})
    assert "site a: actor_cpus 2.0 exceeds the node's num_cpus 1.0" in msg


def test_compute_nice_defaults_low_and_is_bounded() -> None:
    topo = parse_topology({"sites": [{"name": "a"}, {"name": "b", "compute_nice": 0}]}, "t")
    assert [s.compute_nice for s in topo.sites] == [19, 0]
    assert "sites.0.compute_nice" in _error({"sites": [{"name": "a", "compute_nice": 20}]})
    assert "sites.0.compute_nice" in _error({"sites": [{"name": "a", "compute_nice": -1}]})


def test_empty_or_missing_sites() -> None:
    assert "at least one site" in _error({"sites": []})
    assert "sites: Field required" in _error({"cloud": {"num_cpus": 1}})


def test_non_positive_resources_and_bad_ports() -> None:
    assert "cloud.num_cpus" in _error({"cloud": {"num_cpus": 0}, "sites": [{"name": "a"}]})
    assert "sites.0.memory_gb" in _error({"sites": [{"name": "a", "memory_gb": -1}]})
    assert "head_port" in _error({"sites": [{"name": "a"}], "head_port": 80})
    msg = _error({"sites": [{"name": "a"}], "head_port": 7000, "dashboard_port": 7000})
    assert "head_port and dashboard_port must differ" in msg


def test_top_level_must_be_a_mapping() -> None:
    assert "expected a mapping at the top level" in _error([1, 2])
    assert "expected a mapping at the top level" in _error(None)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="does not exist"):
        load_topology(tmp_path / "nope.yaml")


def test_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sites: [ {name: a\n")
    with pytest.raises(TopologyError, match="is not valid YAML"):
        load_topology(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(TopologyError, match="expected a mapping"):
        load_topology(path)


def test_embedded_resources_cover_cloud_and_every_site() -> None:
    topo = uniform_topology(3)
    res = topo.embedded_resources()
    assert res == {CLOUD_RESOURCE: SITE_RESOURCE_QUANTITY,
                   "edge:site-0": SITE_RESOURCE_QUANTITY,
                   "edge:site-1": SITE_RESOURCE_QUANTITY,
                   "edge:site-2": SITE_RESOURCE_QUANTITY}
    # many actors fit on one site: the request is a small fraction of what a site advertises
    assert SITE_RESOURCE_QUANTITY / ACTOR_RESOURCE_REQUEST >= 100
    assert site_resource("site-1") == "edge:site-1"


def test_uniform_topology() -> None:
    topo = uniform_topology(2, memory_gb=0.5)
    assert topo.site_names == ["site-0", "site-1"]
    assert all(s.memory_gb == 0.5 for s in topo.sites)
    with pytest.raises(TopologyError, match="positive integer"):
        uniform_topology(0)
    with pytest.raises(KeyError, match="no site 'nope'"):
        topo.site("nope")


def test_topology_is_frozen() -> None:
    topo = Topology(sites=[{"name": "a"}])
    with pytest.raises(ValueError):
        topo.head_port = 1  # type: ignore[misc]
