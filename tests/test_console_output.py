"""What an operator reads: plain lines off a terminal, progress with rate and time left, the
live site table, Ray's log lines kept off the console, one-sentence start-up errors."""

from __future__ import annotations

import io
import logging
import re
import socket
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import train_tiny_run
from rich.console import Console

from cluster import ray_logs
from experiments.cli import main
from experiments.progress import RunConsole

SINUSOID = {
    "seed": 0,
    "data": {"dataset": "sinusoid", "shots": 5, "queries": 5},
    "model": {"name": "sinusoid_mlp", "hidden": 16},
    "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1, "test_steps": 1},
    "train": {"steps": 20, "meta_batch": 4, "checkpoint_every": 10, "log_every": 10},
    "eval": {"episodes": 10, "batch": 5, "steps_list": [0, 1]},
}
ESCAPES = re.compile(r"[\x1b\r]")


def test_train_off_a_terminal_prints_plain_progress_lines_and_names_the_report(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "sin.yaml"
    config.write_text(yaml.safe_dump({**SINUSOID, "name": "sin",
                                      "output_dir": str(tmp_path / "runs")}))
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert not ESCAPES.search(out), "cursor movement or colour in non-terminal output"
    lines = out.splitlines()
    # a line at every tenth of the way (2, 4, ... 18 of 20), each with rate and time left
    milestones = [ln for ln in lines if re.fullmatch(r"training: \d+/20 steps(, .*)?", ln)]
    assert [int(re.search(r"(\d+)/20", ln).group(1)) for ln in milestones] == list(range(2, 20, 2))
    assert all(re.search(r", [\d.]+ steps/s, ~[\d.]+ s left$", ln) for ln in milestones[1:])
    assert re.fullmatch(r"training: 20/20 steps in [\d.]+ s \([\d.]+ steps/s\)",
                        next(ln for ln in lines if "20/20 steps in" in ln))
    # the meta-test counts its episodes once per adaptation-step setting (10 x [0, 1])
    assert any(re.fullmatch(r"meta-test: 20/20 episodes in .*", ln) for ln in lines)
    assert lines[-1] == f"report: {tmp_path / 'runs' / 'sin' / 'report.html'}"
    html = (tmp_path / "runs" / "sin" / "report.html").read_text()
    assert 'id="series-learning-loss-after"' in html and "<script" not in html


def test_a_bar_off_a_terminal_writes_a_line_per_tenth_then_what_it_took() -> None:
    lines: list[str] = []
    out = RunConsole(live=False)
    out.echo = lines.append  # type: ignore[method-assign]
    with out.bar("work", 35, "items", completed=5) as bar:  # resumed at 5 of 35
        for _ in range(30):
            bar.advance()
    counts = [int(re.match(r"work: (\d+)/35", ln).group(1)) for ln in lines[:-1]]
    assert counts == [8, 12, 16, 20, 24, 28, 32]  # every ceil(35/10) = 4, none before 5
    assert re.fullmatch(r"work: 35/35 items in [\d.]+ s( \([\d.]+ items/s\))?", lines[-1])


def test_the_live_site_table_counts_each_sites_rounds_by_status() -> None:
    out = RunConsole(live=True, console=Console(file=io.StringIO(), force_terminal=True))
    out.sites([{"site": "site-0", "status": "ok"}, {"site": "site-1", "status": "late"}])
    out.sites([{"site": "site-0", "status": "ok"}, {"site": "site-1", "status": "ok"},
               {"site": "site-2", "status": "down"}])
    drawn = Console(file=io.StringIO(), width=100, color_system=None)
    drawn.print(out.site_table())
    rows = {ln.split()[0]: ln.split()[1:] for ln in drawn.file.getvalue().splitlines()[1:]}
    # arrived, late, failed, busy, down, last
    assert rows == {"site-0": ["2", "0", "0", "0", "0", "arrived"],
                    "site-1": ["1", "1", "0", "0", "0", "arrived"],
                    "site-2": ["0", "0", "0", "0", "1", "down"]}


def test_ray_driver_logs_go_to_a_file_and_a_warning_becomes_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(ray_logs.VERBOSE_ENV, raising=False)
    logger = logging.getLogger("edgemeta-test.ray.serve")
    console = logging.StreamHandler()  # stands where Serve puts its console handler
    logger.addHandler(console)
    lines: list[str] = []
    try:
        path = ray_logs.route_driver_logs(tmp_path / "logs", lines.append,
                                          names=["edgemeta-test.ray.serve"])
        logger.info("Started Serve in namespace 'serve'.")
        logger.warning("HTTPOptions.host won't accept connections\nsecond line of detail")
        assert console not in logger.handlers
        assert lines == [f"ray warning: HTTPOptions.host won't accept connections "
                         f"(details: {path})"]
        text = path.read_text()
        assert "Started Serve" in text and "second line of detail" in text
        assert capsys.readouterr().err == ""
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


def test_serve_start_failures_end_in_one_sentence(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    run = train_tiny_run(tmp_path, "sin", "sinusoid")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err == (f"edgemeta serve: could not start: port {port} on 127.0.0.1 is taken by "
                   f"another process: stop it or choose another port with --port\n")

    # a failure inside the start-up: one line naming the traceback's file
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-haproxy"))
    assert main(["serve", str(run), "--ingress", "haproxy", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    trace = run / "logs" / "serve-start-error.log"
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("edgemeta serve: could not start: RuntimeError: HAProxy ingress "
                          "asked for, but no HAProxy binary was found")
    assert f"(traceback: {trace}; Ray's own logs: --verbose)" in err
    assert "Traceback (most recent call last)" in trace.read_text()


def test_an_unreachable_cluster_is_one_line_at_once(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from cluster.ports import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["federated", "federated_sinusoid", "--address", address,
                 "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"edgemeta: error: no Ray cluster answers at {address} (Connection refused): "
                   f"is it up (edgemeta cluster status), and is the address right?\n")


def test_a_failing_command_ends_in_one_line_with_the_traceback_in_a_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(ray_logs.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the traceback goes
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: broken\n")  # no tables, no data
    (tmp_path / "run" / "metrics.parquet").write_text("not parquet")
    assert main(["report", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgemeta report: failed: ")
    trace = Path(re.search(r"\(traceback: (\S+);", err).group(1))
    assert trace.parent == tmp_path and "Traceback (most recent call last)" in trace.read_text()
