"""Analysis throughput and memory: `pkstrace replay` on 1 M / 10 M / 50 M event traces.

The traces are built from the REAL capture tests/fixtures/ftrace_cpuid_2cpu.txt
(4114 events: cpuid cross-CPU calls, IPIs, ICR/TSC-deadline writes, sched_switch
on a 2-CPU host) by block bootstrap, scaled to a 64-CPU host: each *round* lays
32 copies of the capture over disjoint CPU pairs (0-1, 2-3, ..., 62-63), each copy
shifted by a random offset within the capture's span, with fresh csd tokens per
copy; rounds follow each other in time. So the inter-event gaps, the mix of kinds,
the per-CPU pattern and the queue/entry/exit structure are the real ones, and
the analysis does its full work (every call matched, percentiles, isolation with
CPUs 62-63 isolated).

Measured, per size:
- end to end: wall time of ``pkstrace replay FILE --json --isolated 62-63`` in a
  child process, and its peak RSS (``os.wait4`` rusage);
- each family alone: seconds per analysis family (``analyse(timings=...)``) and
  the trace-file read, in a separate child process.

    .venv/bin/python benchmarks/bench_analysis.py            # 1 M, 10 M (3 runs), 50 M (1 run)
    .venv/bin/python benchmarks/bench_analysis.py --smoke    # 200 k events, 1 run
    .venv/bin/python benchmarks/bench_analysis.py --sizes 1e6 --runs 5
    .venv/bin/python benchmarks/bench_analysis.py --compare 69889c0 --sizes 1e7 --runs 3

Writes benchmarks/results/analysis.json (or $PKSTRACE_BENCH_RESULTS/analysis.json):
machine facts, git revision, per-size medians and every run, and the targets
(>= 10 M events/s end to end; 50 M events within 8 GB of RAM) with the margin by
which each is met or missed. Trace files are kept in --workdir (default
/var/tmp/pkstrace-bench-analysis) so reruns skip the build.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pkstrace import schema, tracefile  # noqa: E402

FIXTURE = ROOT / "tests/fixtures/ftrace_cpuid_2cpu.txt"
HOST_CPUS = 64
ISOLATED = "62-63"
TARGET_EVENTS_PER_S = 10_000_000
TARGET_RSS_BYTES = 8 << 30
SEED = 20201217


def _template() -> pd.DataFrame:
    from pkstrace.importers import open_trace

    ev = open_trace(FIXTURE).events
    order = np.argsort(ev["ts"].to_numpy(), kind="stable")
    return ev.take(order).reset_index(drop=True)


def build_trace(path: Path, n_events: int) -> None:
    """Write a trace of n_events built from the real capture (see module doc)."""
    tpl = _template()
    n_t = len(tpl)
    copies = HOST_CPUS // 2
    ts_t = tpl["ts"].to_numpy() - int(tpl["ts"].iloc[0])
    span = int(ts_t[-1]) + 1
    rng = np.random.default_rng(SEED)
    # a few distinct round layouts (random offsets), each a sorted interleaving
    layouts = []
    for _ in range(4):
        offs = rng.integers(0, span, size=copies)
        ts_round = (ts_t[None, :] + offs[:, None]).ravel()
        perm = np.argsort(ts_round, kind="stable")
        layouts.append((perm, ts_round[perm]))
    round_len = n_t * copies
    round_span = 2 * span
    cols = {c: tpl[c] for c in tpl.columns}
    meta = schema.TraceMeta(
        host={"online_cpus": list(range(HOST_CPUS)), "hostname": "bench-synthetic",
              "note": f"block bootstrap of {FIXTURE.name} over {HOST_CPUS} CPUs"},
        backend="bench:bootstrap", clock="local", source=str(FIXTURE.name))
    with tracefile.TraceWriter(path, force=True) as w:
        written, rnd = 0, 0
        while written < n_events:
            perm, ts_sorted = layouts[rnd % len(layouts)]
            take = min(round_len, n_events - written)
            perm, ts_sorted = perm[:take], ts_sorted[:take]
            row, copy = perm % n_t, perm // n_t
            out: dict[str, Any] = {}
            for c in schema.COLUMN_NAMES:
                src = cols[c]
                if isinstance(src.dtype, pd.CategoricalDtype):
                    out[c] = pd.Categorical.from_codes(src.cat.codes.to_numpy()[row],
                                                       dtype=src.dtype)
                else:
                    out[c] = src.to_numpy()[row]
            out["ts"] = ts_sorted + rnd * round_span + 1_000_000_000
            shift = (2 * copy).astype(np.int32)
            out["cpu"] = out["cpu"] + shift
            tgt = out["target_cpu"]
            out["target_cpu"] = np.where(tgt >= 0, tgt + shift, tgt).astype(np.int32)
            csd = out["csd"]
            salt = (np.uint64(rnd) << np.uint64(40)) | (copy.astype(np.uint64) << np.uint64(32))
            out["csd"] = np.where(csd != 0, csd ^ salt, csd).astype(np.uint64)
            w.write(pd.DataFrame(out))
            written += take
            rnd += 1
        w.close(meta)


def bootstrap_trace(work: Path, n: int) -> tuple[Path, float | None]:
    """The n-event bootstrap trace in ``work``, built unless a matching one is there.

    Returns its path and the build time in seconds (None when reused)."""
    path = work / f"bootstrap-{n}.pkstrace"
    if path.exists() and tracefile.read_meta(path).backend == "bench:bootstrap" and \
            len(tracefile.read_trace(path, columns=["cpu"]).events) == n:
        return path, None
    t0 = time.perf_counter()
    build_trace(path, n)
    return path, time.perf_counter() - t0


def _replay_once(path: Path) -> dict[str, Any]:
    exe = ROOT / ".venv/bin/pkstrace"
    cmd = [str(exe), "replay", str(path), "--json", "--isolated", ISOLATED]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(cmd, stdout=devnull, stderr=subprocess.PIPE)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench_analysis: replay failed ({proc.returncode}): {err.strip()}")
    # the 1-minute load average around the run: the host is shared, and wall time
    # stretches with it (CPU time much less)
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_bytes": ru.ru_maxrss * 1024,
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def _families_once(path: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_families", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _families_child(path: str) -> None:
    from pkstrace.analysis import analyse
    from pkstrace.analysis.prep import ANALYSIS_COLUMNS

    t0, c0 = time.perf_counter(), time.process_time()
    trace = tracefile.read_trace(path, columns=list(ANALYSIS_COLUMNS), low_memory=True)
    tm: dict[str, float] = {"read": time.perf_counter() - t0,
                            "cpu:read": time.process_time() - c0}
    findings = analyse(trace, isolated=schema.parse_cpulist(ISOLATED), timings=tm)
    from pkstrace.reports.json import render

    # the JSON document `replay --json` prints: part of the end-to-end time too
    t0, c0 = time.perf_counter(), time.thread_time()
    render(findings)
    tm["render"], tm["cpu:render"] = time.perf_counter() - t0, time.thread_time() - c0
    print(json.dumps(tm))


_AB_CHILD = """
import json, os, sys, time
import pkstrace
assert pkstrace.__file__.startswith(os.path.join(sys.argv[2], "")), pkstrace.__file__
from pkstrace import tracefile
from pkstrace.analysis import analyse
from pkstrace.analysis.prep import ANALYSIS_COLUMNS
from pkstrace.reports.json import render
c0, w0 = time.process_time(), time.perf_counter()
tr = tracefile.read_trace(sys.argv[1], columns=list(ANALYSIS_COLUMNS), low_memory=True)
c1 = time.process_time()
tm = {}
f = analyse(tr, isolated=[62, 63], timings=tm)
c2 = time.process_time()
render(f)
c3, w3 = time.process_time(), time.perf_counter()
out = {"read": c1 - c0, "analyse": c2 - c1, "render": c3 - c2, "wall": w3 - w0}
# each family's own CPU time (the thread that ran it), where this tree reports it
out.update({k: v for k, v in tm.items() if k.startswith("cpu:")})
print(json.dumps(out))
"""


def compare(path: Path, rev: str, runs: int) -> dict[str, Any]:
    """A/B: the analysis of git revision ``rev`` against the working tree on one trace,
    runs alternating (so both see the same load), CPU seconds per phase and per
    family: [median, min]."""
    import tempfile

    res: dict[str, list[dict[str, float]]] = {rev: [], "tree": []}
    with tempfile.TemporaryDirectory(prefix="pkstrace-ab-") as tmp:
        old_tree = os.path.join(tmp, "rev")
        os.mkdir(old_tree)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "pkstrace"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old_tree], input=archive, check=True)
        for _ in range(runs):
            for name, tree in ((rev, old_tree), ("tree", str(ROOT))):
                # cwd: a directory with no package in it (`python -c` puts the cwd
                # first on sys.path, before PYTHONPATH); the child checks which
                # pkstrace it imported
                out = subprocess.run([sys.executable, "-c", _AB_CHILD, str(path), tree],
                                     env={**os.environ, "PYTHONPATH": tree}, cwd=tmp,
                                     capture_output=True, text=True, check=True)
                res[name].append(json.loads(out.stdout))
    # medians, and minima: on a shared host the least-disturbed run is the closest
    # to the code's own cost (CPU time too stretches under load: caches, SMT)
    return {name: {k: [round(_median([r[k] for r in rs if k in r]), 3),
                       round(min(r[k] for r in rs if k in r), 3)] for k in rs[0]}
            for name, rs in res.items()}


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one small run (200 k events)")
    ap.add_argument("--sizes", help="comma-separated event counts (default 1e6,1e7,5e7)")
    ap.add_argument("--runs", type=int, default=3, help="runs per size below 50 M (default 3)")
    ap.add_argument("--workdir", default="/var/tmp/pkstrace-bench-analysis")
    ap.add_argument("--compare", metavar="REV",
                    help="A/B the analysis of git revision REV against the working tree "
                         "on the --sizes trace(s) (built if missing), --runs alternating "
                         "runs; prints CPU seconds per phase and per family as "
                         "[median, min], writes no result file")
    ap.add_argument("--_families", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._families:
        _families_child(args._families)
        return 0
    if args.compare:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        for n in [int(float(x)) for x in (args.sizes or "1e7").split(",")]:
            path = work / f"bootstrap-{n}.pkstrace"
            if not path.exists():
                build_trace(path, n)
            load = os.getloadavg()[0]
            doc = {"events": n, "load_avg_1m_before": round(load, 2),
                   "cpu_s_median_min": compare(path, args.compare, args.runs),
                   "load_avg_1m_after": round(os.getloadavg()[0], 2)}
            print(json.dumps(doc))
        return 0
    from pkstrace.bench.common import git_revision, host_facts, write_json_atomic

    if args.smoke:
        sizes, runs = [200_000], 1
    elif args.sizes:
        sizes, runs = [int(float(s)) for s in args.sizes.split(",")], args.runs
    else:
        sizes, runs = [1_000_000, 10_000_000, 50_000_000], args.runs
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sizes:
        path, built = bootstrap_trace(work, n)
        k = 1 if n >= 50_000_000 else runs
        e2e = [_replay_once(path) for _ in range(k)]
        fam = [_families_once(path) for _ in range(k)]
        wall = _median([r["wall_s"] for r in e2e])
        cpu = _median([r["cpu_s"] for r in e2e])
        rss = max(r["peak_rss_bytes"] for r in e2e)
        fam_med = {key: round(_median([f[key] for f in fam]), 4) for key in fam[0]}
        res = {
            "events": n, "file_bytes": path.stat().st_size, "runs": k,
            "build_s": round(built, 2) if built is not None else None,
            "replay_wall_s_median": round(wall, 3),
            "events_per_s": round(n / wall),
            "replay_cpu_s_median": round(cpu, 3),
            "events_per_cpu_s": round(n / cpu),
            "peak_rss_bytes": rss, "peak_rss_gib": round(rss / (1 << 30), 3),
            "load_avg_1m_range": [min(min(r["load_avg_1m"]) for r in e2e),
                                  max(max(r["load_avg_1m"]) for r in e2e)],
            "families_s_median": fam_med,
            "replay_runs": e2e, "families_runs": fam,
        }
        results.append(res)
        print(f"bench_analysis: {n:>11,} events: replay {wall:.2f}s "
              f"({n / wall / 1e6:.2f} M events/s; CPU {cpu:.2f}s), "
              f"peak RSS {rss / (1 << 30):.2f} GiB; load {res['load_avg_1m_range']}; "
              f"families {fam_med}", file=sys.stderr, flush=True)
    largest = max(results, key=lambda r: r["events"])
    eps = largest["events_per_s"]
    targets = [
        {"target": f">= {TARGET_EVENTS_PER_S / 1e6:.0f} M events/s end to end "
                   f"({largest['events']:,} events)",
         "value": eps, "limit": TARGET_EVENTS_PER_S, "better": "higher",
         "met": eps >= TARGET_EVENTS_PER_S,
         "margin": f"{eps / TARGET_EVENTS_PER_S:.2f}x the target (per CPU second: "
                   f"{largest['events_per_cpu_s'] / TARGET_EVENTS_PER_S:.2f}x)"},
    ]
    big = [r for r in results if r["events"] >= 50_000_000]
    if big:
        rss = big[0]["peak_rss_bytes"]
        targets.append({"target": "50 M events within 8 GiB peak RSS", "value": rss,
                        "limit": TARGET_RSS_BYTES, "better": "lower",
                        "met": rss <= TARGET_RSS_BYTES,
                        "margin": f"{rss / TARGET_RSS_BYTES:.2f}x the limit"})
    else:
        targets.append({"target": "50 M events within 8 GiB peak RSS", "met": None,
                        "margin": "not run (smoke or --sizes without 50 M)"})
    doc = {
        "benchmark": "analysis",
        "command": [sys.executable, *sys.argv],
        "git_revision": git_revision(),
        "host": host_facts(),
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__, "pandas": pd.__version__,
        "trace": f"block bootstrap of {FIXTURE.relative_to(ROOT)} over {HOST_CPUS} CPUs, "
                 f"isolated {ISOLATED}",
        "smoke": bool(args.smoke),
        "results": results,
        "targets": targets,
        "note": "wall clock and CPU time (user + system, both threads) on a shared 2-core "
                "machine: medians of the runs; families_s_median: 'name' is wall, "
                "'cpu:name' the CPU time of the thread that ran it (counts and redundant "
                "run in a second thread beside crosscpu, so their wall times overlap)",
    }
    out_dir = Path(os.environ.get("PKSTRACE_BENCH_RESULTS", ROOT / "benchmarks/results"))
    write_json_atomic(out_dir / "analysis.json", doc)
    print(f"bench_analysis: wrote {out_dir / 'analysis.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
