"""Availability traces: recorded on periods of sites, read from a file the topology names
(``availability: {trace: ...}``), checked when the topology is, and replayed on the run's clock
by :class:`metalearn.availability.TraceSchedule`.

The format (one row per on period; times in seconds of the run's clock, the counted training
time, not wall-clock dates, so a resumed run continues the trace):

``site``
    the trace's name for the site; the topology's ``availability.trace_site`` picks it
    (default: the site's own name), so one trace file can serve many topologies.
``start_s``, ``end_s``
    the site is on in ``[start_s, end_s)`` and away outside every period; ``0 <= start_s <
    end_s``; one site's periods must not overlap (touching periods are one).

A ``.csv`` file has a header row naming the columns (other columns are ignored); a ``.jsonl``
file has one JSON object per line, ``{"site": "site-0", "start_s": 0, "end_s": 12.5}``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

TRACE_COLUMNS = ("site", "start_s", "end_s")
Periods = tuple[tuple[float, float], ...]


def read_trace(path: str | Path) -> dict[str, Periods]:
    """The on periods of each site in an availability trace, sorted by start.

    The format is this module's. Raises ``ValueError`` with a one-line message
    that names the file and, where one is at fault, the row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace {path} does not exist")
    if path.suffix not in (".csv", ".jsonl"):
        raise ValueError(f"trace {path}: unknown format {path.suffix!r}; use .csv or .jsonl")
    try:
        table = (pd.read_csv(path, dtype={"site": str}) if path.suffix == ".csv"
                 else pd.read_json(path, lines=True, dtype={"site": str}))
    except ValueError as err:  # pandas' parser errors, bad JSON, an empty file
        raise ValueError(f"trace {path} cannot be read: {str(err).splitlines()[0]}") from None
    missing = [c for c in TRACE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"trace {path} lacks column(s) {missing}; it needs "
                         f"{', '.join(TRACE_COLUMNS)} (has {list(table.columns)})")
    first_row = 2 if path.suffix == ".csv" else 1  # the file's line of table row 0
    times = table[["start_s", "end_s"]].apply(pd.to_numeric, errors="coerce")
    for i, row in enumerate(table.itertuples(index=False)):
        start, end = times.iloc[i]
        where = f"trace {path} line {i + first_row}"
        if pd.isna(row.site) or not str(row.site).strip():
            raise ValueError(f"{where}: no site")
        if not (np.isfinite(start) and np.isfinite(end)):
            raise ValueError(f"{where}: start_s {row.start_s!r} and end_s {row.end_s!r} must "
                             "be numbers")
        if not 0 <= start < end:
            raise ValueError(f"{where}: needs 0 <= start_s < end_s, got {start:g}, {end:g}")
    out: dict[str, Periods] = {}
    table = table.assign(start_s=times["start_s"], end_s=times["end_s"],
                         line=np.arange(len(table)) + first_row)
    for site, rows in table.groupby("site", sort=True):
        rows = rows.sort_values("start_s", kind="stable")
        ends = rows["end_s"].to_numpy()
        starts = rows["start_s"].to_numpy()
        clash = np.flatnonzero(starts[1:] < ends[:-1])
        if clash.size:
            a, b = rows["line"].iloc[clash[0]], rows["line"].iloc[clash[0] + 1]
            raise ValueError(f"trace {path}: on periods of {site} on lines {a} and {b} overlap")
        out[str(site)] = tuple(zip(starts.tolist(), ends.tolist(), strict=True))
    return out


@lru_cache(maxsize=32)
def _read_cached(path: str, mtime_ns: int) -> dict[str, Periods]:
    return read_trace(path)


def trace_periods(path: str | Path, site: str) -> Periods:
    """The on periods of ``site`` in the trace at ``path`` (read once per file version); a
    ``ValueError`` when the file is unusable or has no period of ``site``."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"trace {path} does not exist")
    sites = _read_cached(str(path), path.stat().st_mtime_ns)
    if site not in sites:
        raise ValueError(f"trace {path} has no period of {site!r} (it has "
                         f"{', '.join(sorted(sites)) or 'none'})")
    return sites[site]
