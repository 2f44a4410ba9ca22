"""`edgemeta serve` on a busy machine: the real command, beside busy loops.

Serving beside training is the product's normal state. Beside two busy loops on two cores the
HAProxy ingress used to fail to start every time (the controller gave a new proxy 5 s to be
ready, then killed it, and ``serve.start`` died with ``ActorDiedError``; see
:mod:`serve.patience`). Here the command starts while this test keeps half the cores busy
(every core: benchmarks/serve_busy.py), answers a prediction, stops cleanly on SIGTERM, and
prints only the project's own lines: none of Ray's warnings (``HTTPOptions.host='127.0.0.1'``,
token authentication) or shutdown retries (``graceful_shutdown failed ... infinite retries``).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import train_tiny_run

from cluster.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
START_LIMIT_S = 600  # a guard against a hang, not a speed target (benchmarks/serve_busy.py)


def busy_loops(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` processes that burn a core each until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.fixture()
def hogs() -> Iterator[list[subprocess.Popen[bytes]]]:
    # Half the cores: beside a loop on every core a start took 138 s on the quiet 2-core
    # machine (benchmarks/serve_busy.py, docs/BENCHMARKS.md), too long for make test.
    procs = busy_loops(max(1, min(cores(), 4) // 2))
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _lines(stream: object, into: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line.rstrip("\n"))
    into.put(None)


@pytest.mark.long
def test_serve_starts_beside_busy_cores_and_answers(tmp_path: Path,
                                                    hogs: list[subprocess.Popen[bytes]]) -> None:
    run = train_tiny_run(tmp_path, "sine", "sinusoid")
    port = free_port()
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "EDGEMETA_VERBOSE": "0"}
    serve = subprocess.Popen([sys.executable, "-m", "experiments.cli", "serve", str(run),
                              "--port", str(port)],
                             cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    out: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(serve.stdout, out), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while not any(ln.startswith("edgemeta serving") for ln in seen):
            line = out.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, f"serve exited ({serve.wait()}): {seen}"
            seen.append(line)
        assert all(h.poll() is None for h in hogs)  # the cores were busy throughout
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/latest/predict",
                       json={"inputs": [-3.0, 0.0, 2.5]}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["values"]) == 3
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=120)
    while (line := out.get(timeout=10)) is not None:
        seen.append(line)
    assert code == 0, seen
    ours = [ln for ln in seen if not ln.startswith("serve: the HTTP proxy ")]  # slow/starting
    assert ours == [f"edgemeta serving {run} at http://127.0.0.1:{port} (ingress: haproxy; "
                    f"docs: http://127.0.0.1:{port}/docs). Ctrl-C to stop.",
                    "edgemeta serve: shutting down"], seen


def test_sigterm_while_serve_starts_undoes_the_start() -> None:
    """A stop that lands in a (long) start raises KeyboardInterrupt there, so ``start`` shuts
    Serve and Ray down; the handler from before is back afterwards."""
    from serve.launch import sigterm_interrupts

    def before(*_: object) -> None:
        raise AssertionError("the handler from before ran during the start")

    previous = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted at once
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)
