"""The cluster state file, ports and the /proc reader, without starting Ray."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import procs
from cluster.ports import first_free_port, port_free, wait_port
from cluster.state import (
    HEAD,
    ClusterError,
    ClusterInfo,
    NodeProcess,
    address_matches,
    read_running_state,
    read_state,
)
from cluster.topology import uniform_topology


def _info(state_dir: Path, head_session: int) -> ClusterInfo:
    info = ClusterInfo(state_dir=str(state_dir), address="127.0.0.1:6391",
                       dashboard_url="http://127.0.0.1:8271",
                       client_address="ray://127.0.0.1:10011",
                       token_path=str(state_dir / "auth_token"), temp_root="/tmp/none",
                       topology=uniform_topology(1).model_dump(mode="json"))
    info.nodes[HEAD] = NodeProcess(name=HEAD, kind="head", temp_dir="/tmp/none/n0",
                                   agent_port=0, log="head.log", session=head_session)
    return info


def test_state_file_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="no local cluster"):
        read_state(tmp_path)
    _info(tmp_path, os.getsid(0)).save()
    back = read_state(tmp_path)
    assert back == _info(tmp_path, os.getsid(0))
    assert back.topo.site_names == ["site-0"]


def test_running_state_needs_a_live_head(tmp_path: Path) -> None:
    assert read_running_state(tmp_path) is None  # nothing recorded
    # A session leader of our own stands in for the head's ``ray start`` (this test's own
    # session id may be 0 where the leader is outside our PID namespace, as in CI's sandbox).
    head = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    try:
        _info(tmp_path, head.pid).save()
        assert read_running_state(tmp_path) is not None
    finally:
        head.kill()
        head.wait()
    assert read_running_state(tmp_path) is None  # the same session, now without a process


def test_address_matches_the_recorded_cluster(tmp_path: Path) -> None:
    info = _info(tmp_path, 0)
    assert address_matches(info, "127.0.0.1:6391") and address_matches(info, "localhost:6391")
    assert address_matches(info, "ray://127.0.0.1:10011")
    assert not address_matches(info, "127.0.0.1:6392")
    assert not address_matches(info, "10.255.0.1:6391")
    assert not address_matches(info, "ray://127.0.0.1:10012")


def test_ports() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert not port_free(taken)
        assert first_free_port(taken, taken + 50) != taken
        wait_port(taken, timeout_s=1)
    with pytest.raises(TimeoutError):
        wait_port(taken, timeout_s=0.3)


def test_process_table_sees_this_process_and_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        table = procs.process_table()
        me = table[os.getpid()]
        assert me.live and me.cpu_s > 0 and me.cmdline
        assert (me.ppid, me.sid) == (os.getppid(), os.getsid(0))
        assert child.pid in procs.descendants(table, [os.getpid()])
        assert procs.rss_bytes(child.pid) > 0
    finally:
        child.kill()
        child.wait()
