"""The report's charts, as inline SVG drawn by matplotlib (no network, no script).

Each function takes a run folder's tables and returns an SVG string, or None when the run has
nothing to draw for it (a centralized run has no rounds; a run without privacy spends no ε).
Every plotted series carries an id ``series-<chart>-<name>`` in the SVG, so a reader (or the
browser test) can find the data points of each chart.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

#: Round-time phases as the rows record them (experiments.runlog.round_row and the driver),
#: in the order a round lives them; each is a seconds column, NaN where a phase did not run.
ROUND_PHASES: tuple[tuple[str, str], ...] = (
    ("put_s", "pack + put"),
    ("secagg_advertise_s", "secure agg.: keys"),
    ("secagg_share_s", "secure agg.: shares"),
    ("dispatch_s_max", "dispatch (longest)"),
    ("compute_s_max", "compute (slowest site)"),
    ("reply_s_max", "reply (longest)"),
    ("secagg_unmask_s", "secure agg.: unmask"),
    ("secagg_sum_s", "secure agg.: sum"),
    ("aggregate_s", "aggregate"),
    ("outer_step_s", "outer step"),
)
SITE_STATUSES = (("arrived", "#4c9a2a"), ("late", "#e0a100"), ("failed", "#c0392b"),
                 ("busy", "#7f8c8d"), ("down", "#2c3e50"))


def _svg(fig: Any) -> str:
    """The figure as an ``<svg>`` element to inline (no XML prolog), then closed."""
    buf = io.StringIO()
    fig.tight_layout()
    # Text stays text (the page's fonts), and ids repeat from run to run (a stable file).
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "edgemeta"}):
        fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float = 6.4, height: float = 3.4) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(width, height))
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _marker(n: int) -> str | None:
    return "o" if n <= 30 else None


def _line(ax: Any, chart: str, name: str, x: Any, y: Any, **style: Any) -> None:
    (line,) = ax.plot(x, y, marker=_marker(len(x)), markersize=3, **style)
    line.set_gid(f"series-{chart}-{name}")


def learning_curves(metrics: pd.DataFrame, x: str) -> str | None:
    """Query loss and accuracy before and after adaptation, per step or round."""
    if metrics.empty:
        return None
    has_acc = any(c in metrics for c in ("acc_after", "test_accuracy"))
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 6.4, 3.4),
                             squeeze=False)
    drawn = 0
    panels = [("loss", axes[0][0])] + ([("acc", axes[0][1])] if has_acc else [])
    for name, ax in panels:
        for when, style in (("before", "--"), ("after", "-")):
            col = f"{name}_{when}"
            if col in metrics and metrics[col].notna().any():
                rows = metrics[metrics[col].notna()]
                _line(ax, f"learning-{name}", when, rows[x], rows[col], linestyle=style,
                      label=f"{when} adaptation")
                drawn += 1
        test = "test_accuracy" if name == "acc" else "test_mse"
        if test in metrics and metrics[test].notna().any():
            rows = metrics[metrics[test].notna()]
            _line(ax, f"learning-{name}", "meta-test", rows[x], rows[test], linestyle="none",
                  label="meta-test")
            drawn += 1
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("query accuracy" if name == "acc" else "query loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if not drawn:  # sites sent no metrics (privacy keeps them home)
        plt.close(fig)
        return None
    return _svg(fig)


def meta_test(summary: Mapping[str, Any]) -> str | None:
    """Sinusoid: MSE by adaptation steps with 95 % intervals. Classification: accuracy ± CI."""
    if isinstance(summary.get("mse"), Mapping):
        steps = [int(k) for k in summary["mse"]]
        mse = [summary["mse"][str(k)] for k in steps]
        ci = [summary["ci95"][str(k)] for k in steps]
        fig, ax = _figure(5.5, 3.2)
        bars = ax.errorbar(steps, mse, yerr=ci, marker="o", capsize=4)
        bars.lines[0].set_gid("series-meta-test-mse")
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel("meta-test MSE")
        ax.set_ylim(bottom=0)
        return _svg(fig)
    if "accuracy" in summary:
        fig, ax = _figure(4.2, 2.6)
        acc, ci = 100 * summary["accuracy"], 100 * summary["ci95"]
        bar = ax.barh([0], [acc], xerr=[ci], capsize=6, color="#3b6fb6", height=0.5)
        bar.patches[0].set_gid("series-meta-test-accuracy")
        ax.set_xlim(0, 100)
        ax.set_yticks([0], ["meta-test"])
        ax.set_xlabel(f"accuracy, % (± 95 % CI, {summary.get('episodes', '?')} episodes)")
        return _svg(fig)
    return None


def personalization(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Per site: held-out accuracy (or MSE) of the meta-model before and after adapting it,
    and of the site's own model after adapting it (when the run made site models)."""
    rows = [r for r in rows if "error" not in r]
    if not rows:
        return None
    key = "accuracy" if "after_accuracy" in rows[0] else "mse"
    series = [("before", "before", "#9db4d9", "meta-model, before adaptation"),
              ("after", "after", "#3b6fb6", "meta-model, after adaptation")]
    if all(f"site_after_{key}" in r for r in rows):
        series.append(("site", "site_after", "#d9822b", "site model, after adaptation"))
    fig, ax = _figure(max(4.5, 1.1 * len(rows) + 2.5), 3.2)
    pos = np.arange(len(rows))
    width = 0.8 / len(series)
    for j, (name, prefix, color, label) in enumerate(series):
        values = [r[f"{prefix}_{key}"] for r in rows]
        errs = [r.get(f"{prefix}_ci95", 0.0) for r in rows]
        bars = ax.bar(pos + (j - (len(series) - 1) / 2) * width, values, width, yerr=errs,
                      capsize=3, color=color, label=label)
        for i, patch in enumerate(bars.patches):
            patch.set_gid(f"series-personalization-{name}-{i}")
    ax.set_xticks(pos, [str(r["site"]) for r in rows])
    top = max(r[f"{prefix}_{key}"] for r in rows for _, prefix, _, _ in series)
    ax.set_ylim(0, top * 1.35 if top > 0 else 1.0)
    ax.set_ylabel(f"held-out {key}")
    ax.legend(loc="upper center", ncol=len(series), fontsize="small")
    return _svg(fig)


def _stacked(ax: Any, chart: str, x: Any, parts: Sequence[tuple[str, Any, str | None]]) -> None:
    bottom = np.zeros(len(x))
    width = 0.8 if len(x) < 2 else 0.8 * float(np.min(np.diff(np.asarray(x, dtype=float))))
    for name, values, color in parts:
        values = np.nan_to_num(np.asarray(values, dtype=float))
        bars = ax.bar(x, values, width, bottom=bottom, label=name, color=color, linewidth=0)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        for i, patch in enumerate(bars.patches):
            patch.set_gid(f"series-{chart}-{slug}-{i}")
        bottom += values


def round_times(metrics: pd.DataFrame) -> str | None:
    """Each round's wall time split into its phases; what the phases leave is "other"."""
    if "round" not in metrics or "wall_s" not in metrics:
        return None
    parts = [(label, metrics[col], None) for col, label in ROUND_PHASES
             if col in metrics and metrics[col].notna().any()]
    known = sum(np.nan_to_num(np.asarray(p[1], dtype=float)) for p in parts)
    parts.append(("other (wait, transfers)",
                  np.clip(metrics["wall_s"].to_numpy(dtype=float) - known, 0.0, None), "#cccccc"))
    fig, ax = _figure(7.5, 3.6)
    _stacked(ax, "round-times", metrics["round"], [(n, 1000 * np.asarray(v, dtype=float), c)
                                                  for n, v, c in parts])
    ax.set_xlabel("round")
    ax.set_ylabel("milliseconds")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg(fig)


def round_bytes(metrics: pd.DataFrame) -> str | None:
    """Bytes sent to the sites and back each round (and secure aggregation's own traffic)."""
    cols = [(c, label) for c, label in (("bytes_down", "parameters down"),
                                         ("bytes_up", "updates up"),
                                         ("secagg_bytes_down", "secure agg. down"),
                                         ("secagg_bytes_up", "secure agg. up"))
            if c in metrics and metrics[c].notna().any()]
    if "round" not in metrics or not cols:
        return None
    fig, ax = _figure()
    for col, label in cols:
        _line(ax, "bytes", col, metrics["round"], metrics[col] / 1e6, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    ax.legend()
    return _svg(fig)


def site_status(metrics: pd.DataFrame) -> str | None:
    """Per round: the sites that arrived, were late, failed, were still busy, or were down."""
    if "round" not in metrics or "arrived" not in metrics:
        return None
    fig, ax = _figure()
    _stacked(ax, "sites", metrics["round"],
             [(status, metrics[status], color) for status, color in SITE_STATUSES
              if status in metrics])
    ax.set_xlabel("round")
    ax.set_ylabel("sites")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _svg(fig)


def site_compute(metrics: pd.DataFrame) -> str | None:
    """Each site's compute time per round (a slow or absent site shows as a gap)."""
    cols = [c for c in metrics.columns if c.startswith("compute_s.")]
    if "round" not in metrics or not cols:
        return None
    fig, ax = _figure()
    for col in cols:
        _line(ax, "site-compute", col.split(".", 1)[1], metrics["round"], 1000 * metrics[col],
              label=col.split(".", 1)[1])
    ax.set_xlabel("round")
    ax.set_ylabel("compute, ms")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return _svg(fig)


def epsilon(metrics: pd.DataFrame) -> str | None:
    """Differential privacy: ε spent after each round (and the cloud's own ε, if recorded)."""
    if "epsilon" not in metrics or not metrics["epsilon"].notna().any():
        return None
    x = "round" if "round" in metrics else "step"
    fig, ax = _figure()
    _line(ax, "epsilon", "epsilon", metrics[x], metrics["epsilon"], label="ε (the guarantee)")
    if "epsilon_cloud" in metrics and metrics["epsilon_cloud"].notna().any():
        finite = metrics[np.isfinite(metrics["epsilon_cloud"].astype(float))]
        if len(finite):
            _line(ax, "epsilon", "cloud", finite[x], finite["epsilon_cloud"], linestyle="--",
                  label="ε against the cloud")
    ax.set_xlabel(x)
    ax.set_ylabel("ε spent")
    ax.set_ylim(bottom=0)
    ax.legend()
    return _svg(fig)
