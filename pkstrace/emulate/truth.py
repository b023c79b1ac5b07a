"""Check the analysis against the PKS module's own counters (the ground truth).

An emulated trace carries, in ``meta.ground_truth``, what the module counted
while it ran. :func:`compare` lines those counters up with the figures
``pkstrace.analysis.analyse`` derived from the events alone; every pair must be
equal. (The tests assert it; ``pkstrace emulate`` prints the table.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# Functions the module's designs run on other CPUs: wrmsrl_on_cpu()'s handler
# (v3) and the module's broadcast handler (broadcast, housekeeping).
DESIGN_FUNCS = ("__wrmsr_on_cpu", "pks_apply_handler")
UPDATER_COMM = "pks_updater"
NO_DEPTH_NOTE = "preempt depth not in this trace"  # analysis/pipeline.py's note


@dataclass(frozen=True)
class Check:
    name: str
    module: Any
    analysis: Any

    @property
    def equal(self) -> bool:
        return self.module == self.analysis


def _design(df: pd.DataFrame, col: str = "func") -> pd.Series:
    if len(df) == 0 or col not in df:
        return pd.Series([], dtype=bool)
    return df[col].astype(str).str.split(" ", n=1).str[0].isin(DESIGN_FUNCS)


def compare(findings: Any, ground_truth: dict[str, Any]) -> list[Check]:
    """Module counter vs analysis figure, for every counter a trace can show."""
    gt = ground_truth
    if not gt.get("complete"):
        return []
    checks: list[Check] = []
    per_cpu = pd.DataFrame(gt.get("per_cpu") or [])

    counts = findings.counts
    n_updates = int(counts.loc[counts["kind"].astype(str) == "global_update", "count"].sum()) \
        if len(counts) else 0
    checks.append(Check("updates", int(gt["updates"]), n_updates))

    calls = findings.calls
    design = calls[_design(calls)] if len(calls) else calls
    remote = design[~design["local"].astype(bool)] if len(design) else design
    checks.append(Check("remote calls", int(gt["remote_calls"]), int(len(remote))))
    if len(per_cpu):
        by_target = remote.groupby("target_cpu").size() if len(remote) else pd.Series(dtype=int)
        for _, row in per_cpu.iterrows():
            cpu = int(row["cpu"])
            checks.append(Check(f"remote calls to CPU {cpu}", int(row["remote_calls_in"]),
                                int(by_target.get(cpu, 0))))

    viol = findings.violations
    design_viol = viol[_design(viol)] if len(viol) else viol
    checks.append(Check("design calls landing on isolated CPUs", int(gt["isolated_hits"]),
                        int(len(design_viol))))

    eps = findings.episodes
    bc = eps[_design(eps) & (eps["mode"].astype(str) == "broadcast")] if len(eps) else eps
    checks.append(Check("broadcasts", int(gt["broadcasts"]), int(len(bc))))

    # v3-raw drives the count negative, and ftrace's 4-bit depth field saturates at
    # 0xf there: the drift is in the module's counters and the console, not the trace.
    # A trace without the depth (bcc, perf: no ftrace flags) cannot show drift at all.
    no_depth = any(str(n).startswith(NO_DEPTH_NOTE) for n in getattr(findings, "notes", []))
    if gt.get("preempt_drift_min") is not None and gt.get("scenario") != "v3-raw" \
            and not no_depth:
        drift = findings.drift
        upd = drift[drift["comm"].astype(str) == UPDATER_COMM] if len(drift) else drift
        checks.append(Check("updates with preempt drift", int(gt["updates"]), int(len(upd))))

    wp = findings.write_pkrs
    if len(per_cpu):
        wpi = wp.set_index("cpu") if len(wp) else pd.DataFrame(
            columns=["calls", "cache_hits", "msr_writes"])
        for col_gt, col_an in (("write_pkrs_calls", "calls"), ("cache_hits", "cache_hits")):
            checks.append(Check(f"write_pkrs {col_an}", int(per_cpu[col_gt].sum()),
                                int(wpi[col_an].sum()) if len(wpi) else 0))
        # the module's msr_writes also count its broadcast handler's writes
        checks.append(Check("write_pkrs MSR writes",
                            int((per_cpu["msr_writes"] - per_cpu["handler_runs"]).sum()),
                            int(wpi["msr_writes"].sum()) if len(wpi) else 0))
        mism = []
        for _, row in per_cpu.iterrows():
            cpu = int(row["cpu"])
            an = (int(wpi.loc[cpu, "calls"]) if cpu in wpi.index else 0,
                  int(wpi.loc[cpu, "cache_hits"]) if cpu in wpi.index else 0)
            if an != (int(row["write_pkrs_calls"]), int(row["cache_hits"])):
                mism.append(cpu)
        checks.append(Check("CPUs whose write_pkrs calls/hits differ", [], mism))

    lost = findings.lost_updates
    types = lost["type"].astype(str).value_counts() if len(lost) else pd.Series(dtype=np.int64)
    checks.append(Check("lost updates: stale cache", int(gt["stale_hits"]),
                        int(types.get("stale_cache", 0))))
    if gt.get("lost_remote_counted", True):
        checks.append(Check("lost updates: remote overwrite", int(gt["lost_remote"]),
                            int(types.get("remote_overwrite", 0))))
    return checks


def table(checks: list[Check]) -> str:
    """The comparison as aligned text lines."""
    if not checks:
        return "ground truth: none (the guest did not finish)\n"
    w = max(len(c.name) for c in checks)
    lines = [f"  {'check':<{w}}  {'module':>8}  {'analysis':>8}"]
    for c in checks:
        mark = "ok" if c.equal else "DIFFERS"
        lines.append(f"  {c.name:<{w}}  {c.module!s:>8}  {c.analysis!s:>8}  {mark}")
    return "\n".join(lines) + "\n"
