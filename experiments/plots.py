"""PNG plots of a run folder's tables (matplotlib's Agg backend: no display needed).

Each function takes a table (a DataFrame of metrics rows, or per-site rows) and a path, draws
one figure, saves it, closes it, and returns the path. They read only column names that the
drivers write, and skip a panel whose columns are absent, so they work for centralized runs
(``step``) and federated runs (``round``) alike.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from metalearn.storage import Location, PathLike, location


def _save(fig: Any, path: PathLike) -> Location:
    """PNG bytes in memory, then one whole write: the path may be in an object store."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out = location(path)
    out.write_bytes(buf.getvalue(), durable=False)
    return out


def learning_curve(metrics: pd.DataFrame, path: PathLike, x: str = "step") -> Location:
    """Query loss (and accuracy) before and after adaptation against steps or rounds."""
    has_acc = "acc_after" in metrics
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 3.8),
                             squeeze=False)
    panels = [("loss", axes[0][0])] + ([("acc", axes[0][1])] if has_acc else [])
    for name, ax in panels:
        for when, style in (("before", "--"), ("after", "-")):
            col = f"{name}_{when}"
            if col in metrics:
                ax.plot(metrics[x], metrics[col], style, label=f"{when} adaptation")
        test_col = "test_accuracy" if name == "acc" else "test_mse"
        if test_col in metrics:
            ax.plot(metrics[x], metrics[test_col], "o", label="meta-test")
        ax.set_xlabel(x)
        ax.set_ylabel("query accuracy" if name == "acc" else "query loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # none when sites send no metrics (DP)
            ax.legend()
    axes[0][0].set_title("meta-training (task-weighted over sites)" if x == "round"
                         else "meta-training")
    return _save(fig, path)


def round_times(metrics: pd.DataFrame, path: PathLike) -> Location:
    """Wall time of each round against its slowest site's compute: the gap is overhead."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(metrics["round"], metrics["wall_s"], label="round wall time")
    ax.plot(metrics["round"], metrics["compute_s_max"], "--", label="slowest site's compute")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def site_personalization(rows: Sequence[dict[str, Any]], path: PathLike) -> Location:
    """Per site: held-out accuracy (or loss) before and after adapting the meta-model."""
    df = pd.DataFrame(list(rows))
    key = "accuracy" if "after_accuracy" in df else "mse"
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(df) + 2), 3.8))
    pos = range(len(df))
    width = 0.38
    ax.bar([p - width / 2 for p in pos], df[f"before_{key}"], width, label="before adaptation")
    ax.bar([p + width / 2 for p in pos], df[f"after_{key}"], width, label="after adaptation")
    ax.set_xticks(list(pos), df["site"])
    top = float(df[[f"before_{key}", f"after_{key}"]].max().max())
    ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)  # headroom for the legend
    ax.set_ylabel(f"held-out {key}")
    ax.set_title("personalization on each site's held-out tasks")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=2)
    return _save(fig, path)


def write_federated_plots(run_dir: PathLike, rows: list[dict], personal: list[dict]
                          ) -> list[Location]:
    """A federated run's figures: learning curve by round, round times, personalization."""
    df, run_dir = pd.DataFrame(rows), location(run_dir)
    paths = [learning_curve(df, run_dir / "learning_curve.png", x="round"),
             round_times(df, run_dir / "round_times.png")]
    if any("error" not in p for p in personal):
        paths.append(site_personalization([p for p in personal if "error" not in p],
                                          run_dir / "personalization.png"))
    return paths
