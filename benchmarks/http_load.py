"""The serving benchmarks' load generator: a minimal keep-alive HTTP/1.1 client on raw sockets.

Minimal so that on a 2-core machine the client takes as little CPU from the servers as
possible: :class:`SyncHTTP` (one connection) for sequential latency, :func:`throughput` (many
keep-alive connections on one asyncio loop) for requests a second.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any


def _request(path: str, body: bytes, host: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


def _parse_head(head: bytes) -> tuple[int, int]:
    """Status and body length; length -1 means a chunked body."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        key = k.strip().lower()
        if key == b"content-length":
            length = int(v)
        elif key == b"transfer-encoding" and b"chunked" in v.lower():
            length = -1
    return status, length


class SyncHTTP:
    """One keep-alive connection; returns (status, body)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port, self.reconnects = host, port, 0
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, path: str, payload: dict[str, Any] | bytes) -> tuple[int, bytes]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        raw = _request(path, body, f"{self.host}:{self.port}")
        try:
            return self._exchange(raw)
        except (ConnectionError, OSError):
            # An ingress reload may close idle keep-alive connections: reconnect once, as
            # HTTP clients do.
            self.reconnects += 1
            self.close()
            self._connect()
            return self._exchange(raw)

    def _exchange(self, raw: bytes) -> tuple[int, bytes]:
        self.sock.sendall(raw)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status, length = _parse_head(head)
        if length >= 0:
            return status, self._take(length)
        out = b""
        while True:
            size = int(self._line(), 16)
            out += self._take(size)
            self._take(2)
            if size == 0:
                return status, out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self._recv()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


async def _worker(host: str, port: int, raw: bytes, stop_at: float, codes: dict[int, int]
                  ) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    done = 0
    try:
        while time.perf_counter() < stop_at:
            writer.write(raw)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()  # closed by an ingress reload: reconnect and go on
                codes[-1] = codes.get(-1, 0) + 1
                reader, writer = await asyncio.open_connection(host, port)
                continue
            status, length = _parse_head(head[:-4])
            if length >= 0:
                await reader.readexactly(length)
            else:
                while (size := int(await reader.readuntil(b"\r\n"), 16)) > 0:
                    await reader.readexactly(size + 2)
                await reader.readexactly(2)
            codes[status] = codes.get(status, 0) + 1
            done += 1
    finally:
        writer.close()
    return done


def throughput(host: str, port: int, path: str, payload: dict[str, Any], concurrency: int,
               seconds: float, headers: dict[str, str] | None = None
               ) -> tuple[float, dict[int, int]]:
    """Requests a second over ``seconds`` with ``concurrency`` connections, and the count of
    each answer status (-1: a connection the server closed, reopened)."""
    raw = _request(path, json.dumps(payload).encode(), f"{host}:{port}", headers)
    codes: dict[int, int] = {}

    async def run() -> int:
        stop_at = time.perf_counter() + seconds
        counts = await asyncio.gather(*[_worker(host, port, raw, stop_at, codes)
                                        for _ in range(concurrency)])
        return sum(counts)

    t0 = time.perf_counter()
    n = asyncio.run(run())
    return n / (time.perf_counter() - t0), codes


def latencies(client: SyncHTTP, path: str, payloads: list[Any], n: int,
              warmup: int = 20) -> list[float]:
    """Milliseconds of each of ``n`` sequential requests, after ``warmup`` uncounted ones."""
    for i in range(warmup):
        client.post(path, payloads[i % len(payloads)])
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        status, body = client.post(path, payloads[i % len(payloads)])
        out.append((time.perf_counter() - t0) * 1e3)
        if status != 200:
            raise RuntimeError(f"{path}: HTTP {status}: {body[:300]!r}")
    return out


def pct(xs: list[float], q: float) -> float:
    """The ``q``-th percentile of ``xs``: the sorted value at the rounded rank, no interpolation."""
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]



async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
                    ) -> tuple[int, bool]:
    """One request on an open connection: (status, whether a Retry-After header came back)."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status, length = _parse_head(head[:-4])
    retry_after = b"\r\nretry-after:" in head.lower()
    if length >= 0:
        await reader.readexactly(length)
    else:
        while (size := int(await reader.readuntil(b"\r\n"), 16)) > 0:
            await reader.readexactly(size + 2)
        await reader.readexactly(2)
    return status, retry_after


def open_loop(host: str, port: int, path: str, payload: dict[str, Any], rate: float,
              seconds: float, max_connections: int = 2048) -> list[tuple[float, int, bool]]:
    """Requests at a fixed ``rate`` a second for ``seconds``, whatever the answers (an open
    loop: unlike :func:`throughput`, arrivals do not wait for answers, so an overload is
    offered as it would be by many independent clients).

    Each arrival takes an idle keep-alive connection or opens one (up to
    ``max_connections``). Returns one ``(milliseconds, status, retry_after_present)`` per
    request; status -1 is a connection error, -2 an arrival with no connection left."""
    raw = _request(path, json.dumps(payload).encode(), f"{host}:{port}")
    results: list[tuple[float, int, bool]] = []
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = 0

    async def one() -> None:
        nonlocal opened
        t0 = time.perf_counter()
        if idle:
            conn = idle.pop()
        elif opened < max_connections:
            opened += 1
            try:
                conn = await asyncio.open_connection(host, port)
            except OSError:
                opened -= 1
                results.append(((time.perf_counter() - t0) * 1e3, -1, False))
                return
        else:
            results.append((0.0, -2, False))
            return
        try:
            status, retry_after = await _exchange(*conn, raw)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            conn[1].close()
            opened -= 1
            results.append(((time.perf_counter() - t0) * 1e3, -1, False))
            return
        results.append(((time.perf_counter() - t0) * 1e3, status, retry_after))
        idle.append(conn)

    async def run() -> None:
        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        for _, writer in idle:
            writer.close()

    asyncio.run(run())
    return results
