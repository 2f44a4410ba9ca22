"""report.html opened in a real headless Chromium: the charts render with their data points,
and the page logs no console error. The federated run behind it is the real command in its
own process (non-terminal stdout), which also shows that Ray's log lines stay off the console.

Needs Debian's ``chromium`` and ``chromium-driver`` (`make test` installs them when missing,
through scripts/ensure_chromium.sh).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import train_tiny_run

from experiments.report import write_report

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 4
#: What a line of Ray's own looks like on a driver's console (a forwarded worker line, a
#: logger line with Ray's format, the raylet's messages).
RAY_LINE = re.compile(r"\((pid=|raylet|\w+ pid=)|^(INFO|WARNING|ERROR) \d{4}-|"
                      r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING)")

# Every plotted element of a chart: id, drawn size, and how many points its path has.
SERIES_JS = """
return Array.from(document.querySelectorAll('figure.chart')).map(fig => {
  const svg = fig.querySelector('svg');
  const box = svg.getBoundingClientRect();
  const series = Array.from(svg.querySelectorAll('[id^="series-"]')).map(el => {
    const r = el.getBoundingClientRect();
    const path = el.querySelector('path');
    const d = (path && path.getAttribute('d')) || '';
    return {id: el.id, w: r.width, h: r.height, points: (d.match(/[ML]/g) || []).length,
            markers: el.querySelectorAll('use').length};
  });
  return {chart: fig.dataset.chart, w: box.width, h: box.height, series: series};
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if chromium is None or driver_bin is None:
        pytest.fail("this test needs Chromium and its driver: apt-get install -y chromium "
                    "chromium-driver (make test does it when they are missing)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_bin))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A federated MAML run with device-level DP and one failing site, by the real command."""
    out = tmp_path_factory.mktemp("fed")
    sets = ["output_dir=" + str(out), f"train.steps={ROUNDS}", "train.log_every=2",
            "train.checkpoint_every=2", "eval.episodes=20", "eval.batch=20",
            "eval.steps_list=[0,1]", "federated.personalize_episodes=5", "federated.quorum=2",
            "federated.topology={sites: 3, devices: 25}", "federated.fail_sites=[site-2]",
            "federated.privacy.target_epsilon=null"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("EDGEMETA_VERBOSE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "federated", "federated_sinusoid_dp", "--fresh",
         *(a for s in sets for a in ("--set", s))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out / "federated_sinusoid_dp", proc.stdout + proc.stderr


def _open(browser: Any, path: Path, shot: Path) -> list[dict[str, Any]]:
    browser.get_log("browser")  # drop what an earlier page logged
    browser.get(Path(path).resolve().as_uri())
    charts = browser.execute_script(SERIES_JS)
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1200, min(height + 50, 8000))
    browser.save_screenshot(str(shot))
    problems = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert problems == []
    assert shot.stat().st_size > 10_000
    return charts


def _by_chart(charts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {c["chart"]: c for c in charts}
    for c in charts:
        assert c["w"] > 200 and c["h"] > 100, c["chart"]  # laid out, not collapsed
        assert c["series"], f"chart {c['chart']} has no data series"
    return out


def _series(chart: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [s for s in chart["series"] if s["id"].startswith(prefix)]


def test_console_stays_the_projects_own_and_plain(federated_run: tuple[Path, str]) -> None:
    run, output = federated_run
    lines = output.splitlines()
    assert not re.search(r"[\x1b\r]", output)
    assert [ln for ln in lines if RAY_LINE.search(ln)] == []
    assert lines[-1] == f"report: {run / 'report.html'}"
    assert (run / "logs" / "ray-driver.log").is_file()  # where the driver's Ray lines went
    assert sum("site-2 failed" in ln for ln in lines) >= 1  # trouble still shows, once a round


def test_federated_report_renders_every_chart_with_its_points(
        browser: Any, federated_run: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = federated_run
    charts = _by_chart(_open(browser, run / "report.html", tmp_path / "federated.png"))
    assert set(charts) == {"learning", "meta-test", "personalization", "round-times", "bytes",
                           "sites", "site-compute", "privacy"}
    # a point per round on the line charts (markers drawn for short runs)
    for chart, prefix in (("learning", "series-learning-loss-after"),
                          ("bytes", "series-bytes-bytes_down"),
                          ("privacy", "series-epsilon-epsilon")):
        (line,) = _series(charts[chart], prefix)
        assert line["points"] == ROUNDS and line["markers"] == ROUNDS, (chart, line)
        assert line["w"] > 100, (chart, line)
    # meta-test MSE at 0 and 1 adaptation steps
    (mse,) = _series(charts["meta-test"], "series-meta-test-mse")
    assert mse["points"] == 2
    # sites per round, a bar per round and status whose height is the count the run recorded.
    # (Poisson sampling of devices draws from secure randomness: a site none of whose devices
    # was drawn is not called that round, so the counts differ from run to run.)
    metrics = pd.read_parquet(run / "metrics.parquet")
    arrived = _series(charts["sites"], "series-sites-arrived-")
    failed = _series(charts["sites"], "series-sites-failed-")
    assert len(arrived) == len(failed) == ROUNDS
    counts = [*metrics["arrived"], *metrics["failed"]]
    assert sum(metrics["failed"]) >= 1 and sum(metrics["arrived"]) >= ROUNDS
    assert all(b["w"] > 0 for b in arrived + failed)
    unit = max(b["h"] for b in arrived + failed) / max(counts)  # pixels per site
    assert unit > 5
    for bar, count in zip(arrived + failed, counts, strict=True):
        assert abs(bar["h"] - count * unit) < 1.0, (bar, count)
    # the round-time breakdown stacks the slowest compute in every round
    compute = _series(charts["round-times"], "series-round-times-compute-slowest-site-")
    assert len(compute) == ROUNDS and all(b["h"] > 0 for b in compute)
    # personalization (the failing site only fails its rounds): a bar per site, before and after
    assert len(_series(charts["personalization"], "series-personalization-after-")) == 3
    assert len(_series(charts["personalization"], "series-personalization-before-")) == 3


def test_centralized_report_renders_its_curves(browser: Any, tmp_path: Path) -> None:
    run = train_tiny_run(tmp_path, "sin", "sinusoid")
    charts = _by_chart(_open(browser, write_report(run), tmp_path / "centralized.png"))
    assert set(charts) == {"learning", "meta-test"}
    (line,) = _series(charts["learning"], "series-learning-loss-after")
    assert line["points"] == 2  # two training steps
