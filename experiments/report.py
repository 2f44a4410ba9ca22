"""``edgemeta report RUN``: one self-contained ``report.html`` for a run folder.

The page holds everything it shows: charts are inline SVG (:mod:`experiments.report_charts`),
styles are inline, and there is no script, font or image to fetch, so it opens offline, from a
job's artifacts or an e-mail. It reads only the run folder (``config.yaml``, ``summary.json``,
``metrics.parquet``, ``sites.parquet``), so it can be written again at any time; both trainers
write it at the end of every run. A section whose data the run did not record (a centralized
run has no rounds, a run without privacy spends no ε) says so instead of drawing nothing.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import yaml
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from experiments import report_charts as charts
from experiments.runlog import METRICS_FILE, SITES_FILE, SUMMARY_FILE, headline, read_run_config
from metalearn.storage import Location, PathLike, location

REPORT_FILE = "report.html"


@dataclass
class Section:
    id: str
    title: str
    svg: Markup | None
    caption: str
    table: list[list[str]] | None = None


def _table(where: Location) -> pd.DataFrame:
    try:
        return pd.read_parquet(io.BytesIO(where.read_bytes()))
    except FileNotFoundError:
        return pd.DataFrame()


def _read(run_dir: Location) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame,
                                      pd.DataFrame]:
    config = read_run_config(run_dir)
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except FileNotFoundError:
        summary = {}
    return config or {}, summary, _table(run_dir / METRICS_FILE), _table(run_dir / SITES_FILE)


def _facts(summary: dict[str, Any], metrics: pd.DataFrame,
           federated: bool) -> list[tuple[str, str]]:
    unit = "rounds" if federated else "steps"
    if isinstance(summary.get("mse"), dict) and summary["mse"]:
        most = max(summary["mse"], key=int)  # the most adaptation steps evaluated
        test = f"MSE {summary['mse'][most]:.3f} ± {summary['ci95'][most]:.3f} ({most} steps)"
    elif "accuracy" in summary:
        test = headline(summary)
    else:
        test = "not run (stopped early)"
    facts = [("meta-test", test),
             (unit, str(summary.get("train_steps", len(metrics)))),
             ("training time", f"{summary.get('train_time_s', float('nan')):.1f} s"),
             ("tasks seen", str(summary.get("train_tasks", "?")))]
    fed = summary.get("federated") or {}
    if federated:
        facts += [("sites", str(len(fed.get("sites", [])) or "?")),
                  ("aggregator", str((fed.get("aggregator") or {}).get("name", "?"))),
                  ("skipped rounds", str(fed.get("skipped_rounds", "?")))]
        if fed.get("median_round_s") is not None:
            facts.append(("median round", f"{1000 * fed['median_round_s']:.0f} ms"))
        if fed.get("bytes_up") is not None:
            facts.append(("traffic", f"{(fed['bytes_down'] + fed['bytes_up']) / 1e6:.1f} MB"))
    privacy = summary.get("privacy") or {}
    if "epsilon" in privacy:
        facts.append(("ε spent", f"{privacy['epsilon']:.3f} (δ {privacy.get('delta', '?')})"))
    return facts


def _personal_table(rows: list[dict[str, Any]]) -> list[list[str]] | None:
    rows = [r for r in rows if "error" not in r]
    if not rows:
        return None
    key = "accuracy" if "after_accuracy" in rows[0] else "mse"
    site = all(f"site_after_{key}" in r for r in rows)
    table = [["site", f"before ({key})", f"after ({key})",
              *([f"site model, after ({key})"] if site else []), "episodes", "steps"]]
    for r in rows:
        cells = [f"{r[f'{p}_{key}']:.3f} ± {r.get(f'{p}_ci95', 0):.3f}"
                 for p in ("before", "after", *(["site_after"] if site else []))]
        table.append([str(r["site"]), *cells, str(r.get("episodes", "")),
                      str(r.get("steps", ""))])
    return table


def _site_table(sites: pd.DataFrame) -> list[list[str]] | None:
    if sites.empty or "status" not in sites:
        return None
    counts = sites.groupby(["site", "status"]).size().unstack(fill_value=0)
    statuses = [s for s in ("ok", "late", "failed", "busy", "down") if s in counts]
    statuses += [s for s in counts.columns if s not in statuses]
    table = [["site", *("arrived" if s == "ok" else s for s in statuses)]]
    for site, row in counts.iterrows():
        table.append([str(site), *(str(int(row[s])) for s in statuses)])
    return table


def _sections(summary: dict[str, Any], metrics: pd.DataFrame, sites: pd.DataFrame,
              federated: bool) -> list[Section]:
    x = "round" if federated else "step"

    def svg(text: str | None) -> Markup | None:
        return None if text is None else Markup(text)  # our own matplotlib output

    out = [Section("learning", "Learning curves",
                   svg(charts.learning_curves(metrics, x)),
                   f"Query loss and accuracy on the training tasks, before and after the inner "
                   f"adaptation, per {x}" + (" (task-weighted over the sites that arrived)"
                                             if federated else "") + ".")]
    out.append(Section("meta-test", "Meta-test", svg(charts.meta_test(summary)),
                       (f"Held-out classes never seen in training: {headline(summary)}, "
                        f"{summary.get('episodes', '?')} episodes, 95 % confidence interval."
                        if ("accuracy" in summary or "mse" in summary)
                        else "No meta-test: the run stopped before its end.")))
    fed = summary.get("federated") or {}
    personal = fed.get("personalization") or []
    if federated:
        out.append(Section("personalization", "Per-site accuracy before and after adaptation",
                           svg(charts.personalization(personal)),
                           "Each site's held-out tasks, before and after adapting the final "
                           "meta-model, and after adapting the site's own model (the "
                           "meta-model fine-tuned on the site's training tasks, served as "
                           "RUN@site-NAME), on the same episodes." if personal else
                           "Not recorded (personalize_episodes is 0, or the run stopped early).",
                           _personal_table(personal)))
        out.append(Section("round-times", "Round time breakdown",
                           svg(charts.round_times(metrics)),
                           "Where each round's wall time went, as the driver measured it: "
                           "packing and putting the parameters, the longest dispatch, the "
                           "slowest site's compute, the longest reply, aggregation and the "
                           "outer step; 'other' is the rest (waiting, transfers, reading "
                           "replies). Longest and slowest may be different sites."))
        out.append(Section("bytes", "Bytes per round", svg(charts.round_bytes(metrics)),
                           "Parameters sent to the sites called, updates back from those that "
                           "arrived."))
        out.append(Section("sites", "Sites per round: arrived, late, failed, busy, down",
                           svg(charts.site_status(metrics)),
                           "Late: missed the round's deadline; busy: still on a late call, so "
                           "not called; down: unreachable.", _site_table(sites)))
        out.append(Section("site-compute", "Compute per site", svg(charts.site_compute(metrics)),
                           "Each site's local compute per round (gaps: the site did not "
                           "arrive)."))
    privacy = summary.get("privacy") or {}
    if "epsilon" in metrics or privacy:
        out.append(Section("privacy", "Differential privacy: ε spent", svg(charts.epsilon(metrics)),
                           f"Privacy loss accumulated over the rounds at δ "
                           f"{privacy.get('delta', '?')}" + (f"; final ε {privacy['epsilon']:.3f}"
                                                             if "epsilon" in privacy else "")
                           + "."))
    return out


def write_report(run_dir: PathLike, out: PathLike | None = None) -> Location:
    """Write the run folder's report (default ``RUN_DIR/report.html``, in the run's storage:
    a local folder or object storage); returns where it went."""
    run_dir = location(run_dir)
    config, summary, metrics, sites = _read(run_dir)
    federated = bool(config.get("federated")) or "round" in metrics
    data = config.get("data", {})
    shape = (f"{data.get('shots')}-shot" if data.get("dataset") == "sinusoid"
             else f"{data.get('ways')}-way {data.get('shots')}-shot")
    kind = "federated" if federated else "centralized"
    subtitle = (f"{kind} {config.get('algorithm', {}).get('name', '?')} on "
                f"{data.get('dataset', '?')} ({shape})")
    env = Environment(loader=PackageLoader("experiments", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        name=config.get("name", run_dir.name), subtitle=subtitle,
        facts=_facts(summary, metrics, federated),
        sections=_sections(summary, metrics, sites, federated),
        config_text=yaml.safe_dump(config, sort_keys=False), run_dir=str(run_dir),
        written=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    path = location(out) if out is not None else run_dir / REPORT_FILE
    path.write_bytes(html.encode(), durable=False)  # rewritable from the run folder at will
    return path
