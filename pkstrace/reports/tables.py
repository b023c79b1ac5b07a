"""Export the findings tables as CSV or Parquet files, for pandas and spreadsheets.

``write_tables(findings, out_dir, fmt)`` writes one file per table into
``out_dir`` (``<table>.csv`` or ``<table>.parquet``), every table with its
documented columns even when it has no rows, plus ``summary.<ext>``: one row per
scalar figure (the cross-CPU call summary, redundant total, isolated CPUs,
trace metadata), as ``section, key, value`` text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pkstrace.analysis.findings import Findings
from pkstrace.errors import PkstraceError
from pkstrace.tracefile import create_output, create_output_dir, finish_output

FORMATS = ("csv", "parquet")


class ExportError(PkstraceError):
    """A table cannot be written (message is one line)."""


def findings_tables(f: Findings) -> dict[str, pd.DataFrame]:
    """The findings' tables by file name (the JSON document's sections, flattened)."""
    return {
        "counts": f.counts,
        "activity": f.activity,
        "redundant_by_cpu_msr": f.redundant_by_cpu_msr,
        "redundant_by_task": f.redundant_by_task,
        "write_pkrs": f.write_pkrs,
        "calls": f.calls,
        "latency_per_target_cpu": f.latency_per_target_cpu,
        "latency_per_func": f.latency_per_func,
        "latency_per_callsite": f.latency_per_callsite,
        "latency_per_source_target": f.latency_per_source_target,
        "episodes": f.episodes,
        "projection": f.projection,
        "violations": f.violations,
        "drift": f.drift,
        "lost_updates": f.lost_updates,
        "summary": summary_table(f),
    }


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, default=str, sort_keys=True)


def summary_table(f: Findings) -> pd.DataFrame:
    rows: list[tuple[str, str, str]] = []
    for k, v in f.cross_cpu_summary.items():
        rows.append(("cross_cpu_calls", str(k), _text(v)))
    rows.append(("redundant_msr_writes", "total", str(int(f.redundant_total or 0))))
    rows.append(("isolation", "isolated_cpus", _text(list(f.isolated_cpus))))
    rows.append(("activity", "bin_ns", str(int(f.activity_bin_ns or 0))))
    for k, v in f.trace.items():
        rows.append(("trace", str(k), _text(v)))
    for k, v in f.ground_truth.items():
        rows.append(("ground_truth", str(k), _text(v)))
    for n in f.notes:
        rows.append(("notes", "note", str(n)))
    return pd.DataFrame(rows, columns=["section", "key", "value"])


def _arrow_ready(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (lists, None, numbers) become JSON/text, so that
    Parquet gets one type per column; homogeneous columns keep their type."""
    out = {}
    for c in df.columns:
        s = df[c]
        if s.dtype == object and len(s):
            kinds = {type(x) for x in s.tolist() if x is not None and x is not pd.NA}
            if len(kinds) > 1 or kinds & {list, tuple, dict, np.ndarray}:
                s = pd.Series([None if x is None or x is pd.NA else
                               _text(x.tolist() if isinstance(x, np.ndarray) else x)
                               for x in s.tolist()], index=s.index, dtype=object)
        out[c] = s
    return pd.DataFrame(out, index=df.index)


def write_tables(f: Findings, out_dir: str | os.PathLike[str], fmt: str,
                 force: bool = False) -> list[Path]:
    """Write every findings table into out_dir. Returns the files written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown table format {fmt!r} (choose from {', '.join(FORMATS)})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    tables = findings_tables(f)
    targets = {name: out / f"{name}.{fmt}" for name in tables}
    if not force:
        clash = [str(p) for p in targets.values() if p.exists()]
        if clash:
            raise ExportError(f"{clash[0]} exists (use --force to overwrite)")
    try:
        create_output_dir(out)  # under sudo: the invoking user's directory
    except OSError as e:
        raise ExportError(f"cannot create {out}: {e.strerror or e}") from None
    written = []
    for name, df in tables.items():
        path = targets[name]
        # O_EXCL temp file, written through its descriptor, owned by the sudo user
        f, tmp_name = create_output(path, "w" if fmt == "csv" else "wb")
        tmp = Path(tmp_name)
        try:
            if fmt == "csv":
                df.to_csv(f, index=False)
            else:
                table = pa.Table.from_pandas(_arrow_ready(df), preserve_index=False)
                pq.write_table(table, f, compression="zstd")
            finish_output(f, tmp_name, path)
        except OSError as e:
            _close_quietly(f)
            _unlink(tmp)
            raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
        except (pa.ArrowException, ValueError, TypeError) as e:
            _close_quietly(f)
            _unlink(tmp)
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ExportError(f"cannot write table {name}: {msg}") from None
        written.append(path)
    return written


def _close_quietly(f: Any) -> None:
    try:
        f.close()
    except OSError:
        pass


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass
