"""`pkstrace export`: a trace -> Perfetto timeline JSON, or the findings tables as CSV/Parquet."""

from __future__ import annotations

import argparse

HELP = "export a trace to Perfetto (Chrome trace JSON) or its findings to CSV / Parquet"
DESCRIPTION = """\
perfetto  Chrome trace-event JSON that ui.perfetto.dev and chrome://tracing open:
          one track per CPU; cross-CPU call handlers (csd entry -> exit) as
          slices on the target CPU; a flow arrow from each csd queue on the
          sender to its handler on the target; MSR writes per CPU as counters
          (and the PKRS value written); isolation violations as instant events.
csv       the findings tables, one file per table in the directory OUT
parquet   the same tables as Parquet files (one per table) in OUT

The tables: counts, activity, redundant_by_cpu_msr, redundant_by_task,
write_pkrs, calls, latency_per_{target_cpu,func,callsite,source_target},
episodes, projection, violations, drift, lost_updates, and summary (one
section,key,value row per scalar figure). Columns as in `pkstrace replay --json`.
"""
EXAMPLES = """\
examples:
  pkstrace export host.pkstrace --format perfetto -o host.json   # open in ui.perfetto.dev
  pkstrace export trace.txt --format csv -o tables/              # ftrace text capture
  pkstrace export v3.pkstrace --format parquet -o v3-tables/
  python3 -c "import pandas as pd; print(pd.read_csv('tables/calls.csv').describe())"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", metavar="TRACE", help="trace file (.pkstrace or text capture)")
    parser.add_argument("--format", required=True, choices=("perfetto", "csv", "parquet"),
                        help="what to write")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="JSON file (perfetto) or directory (csv, parquet)")
    parser.add_argument("--calibration", metavar="FILE",
                        help="calibration from `pkstrace bench ipi -o FILE` (projection table)")
    parser.add_argument("--isolated", metavar="CPULIST",
                        help="treat these CPUs as isolated (overrides the trace's host facts)")
    parser.add_argument("-f", "--force", action="store_true",
                        help="overwrite existing output files")


def run(args: argparse.Namespace) -> int:
    from pkstrace.commands.report import analyse_file, check_output, parse_isolated

    isolated = parse_isolated(args.isolated)
    if args.format == "perfetto":
        from pkstrace.reports import perfetto

        out = check_output(args.output, args.force)
        trace, findings = analyse_file(args.trace, isolated=isolated,
                                       calibration=args.calibration)
        try:
            counts = perfetto.write_perfetto(out, trace, findings)
        except OSError as e:
            from pkstrace.errors import PkstraceError

            raise PkstraceError(f"cannot write {out}: {e.strerror or e}") from None
        print(f"wrote {out}: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))
        return 0
    from pkstrace.reports import tables

    _, findings = analyse_file(args.trace, isolated=isolated, calibration=args.calibration)
    written = tables.write_tables(findings, args.output, args.format, force=args.force)
    print(f"wrote {len(written)} tables to {args.output}/ ({args.format})")
    return 0
