"""TCP ports on this host: pick a free one, check one, wait until something listens on one.

The local launcher picks per-node ports with these (so two clusters on one host do not
collide), tests use :func:`first_free_port` to stay off Ray's defaults, and the benchmarks wait
for their servers with :func:`wait_port`. Standard library only.
"""

from __future__ import annotations

import errno
import socket
import time


def free_port(host: str = "") -> int:
    """A port the kernel reports free now. ``""`` (the default) binds every interface, so the
    port is also free on loopback; another process may still take it before the caller does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def can_bind(host: str, port: int) -> bool:
    """Whether a TCP listener could take ``port`` on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound both on every interface and on loopback (Ray's GCS binds
    the former, its dashboard the latter)."""
    return all(can_bind(host, port) for host in ("", "127.0.0.1"))


def first_free_port(start: int, stop: int) -> int:
    """The first port in [start, stop) nothing listens on (tests use it to stay off defaults)."""
    for port in range(start, stop):
        if port_free(port):
            return port
    raise OSError(errno.EADDRINUSE, f"no free port in {start}-{stop - 1}")


def wait_port(port: int, timeout_s: float = 60.0, host: str = "127.0.0.1") -> None:
    """Return once a TCP connection to ``host:port`` succeeds; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")
