"""`pkstrace import`: turn a text trace (ftrace, trace-cmd report, perf script) into a .pkstrace."""

from __future__ import annotations

import argparse
import sys

HELP = "convert an ftrace / trace-cmd / perf script text capture into a .pkstrace file"
DESCRIPTION = """\
Convert a text trace into a .pkstrace file (Parquet) that `pkstrace replay`, pandas,
polars and DuckDB read. Recognised, with the format detected from the content:
  - tracefs `trace` / `trace_pipe` output (flags column of 5, 4 or no characters,
    with or without the tgid column), `trace-cmd report` (also -l),
  - `perf script` default output,
  - any of these wrapped in a serial console log or a mail quote ("> "),
  - gzip / xz / bzip2 / zstd compressed.
Lines that are not understood and events pkstrace does not model are counted by
reason / name (shown below and stored in the file's metadata), never fatal."""
EXAMPLES = """\
examples:
  pkstrace import trace.txt -o host.pkstrace          # tracefs `cat trace` output
  pkstrace import perf.txt -o host.pkstrace           # `perf script > perf.txt`
  pkstrace import guest-serial.log --cpus 8 --isolated 6-7 -o guest.pkstrace
  cat /sys/kernel/tracing/trace | pkstrace import - -o now.pkstrace
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="text capture to import ('-' = stdin)")
    parser.add_argument("-o", "--output", metavar="OUT", required=True,
                        help="the .pkstrace file to write")
    parser.add_argument("--isolated", metavar="LIST",
                        help="isolated / nohz_full CPUs of the traced host (e.g. 6-7)")
    parser.add_argument("--cpus", metavar="N", type=int,
                        help="the traced host had CPUs 0..N-1 online (default: from the "
                             "capture's #P:N / cpus=N header, else the highest CPU seen)")
    parser.add_argument("--format", choices=("auto", "ftrace_text", "perf_script"),
                        default="auto", help="input format (default: detect)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite OUT")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pkstrace import tracefile
    from pkstrace.errors import InputError
    from pkstrace.importers import open_trace, parse_isolated

    out = Path(args.output)
    if out.exists() and not args.force:  # fail before the (possibly long) parse
        raise InputError(f"{out} exists (use --force to overwrite)")
    isolated = parse_isolated(args.isolated) if args.isolated is not None else None
    fmt = None if args.format == "auto" else args.format
    trace = open_trace(args.file, isolated=isolated, cpus=args.cpus, fmt=fmt)
    trace.meta.command = ["pkstrace", "import", *sys.argv[2:]] if sys.argv[1:2] == ["import"] \
        else ["pkstrace", "import", str(args.file)]
    tracefile.write_trace(out, trace, force=args.force)
    if not args.quiet:
        print(summary(trace, str(args.file), str(out)))
    return 0


def summary(trace, source: str, out: str) -> str:  # noqa: ANN001 - schema.Trace
    """A few lines on what was imported and what was not understood."""
    meta = trace.meta
    imp = meta.extra.get("import", {})
    lines = [f"{source}: {imp.get('format', meta.backend)}, {imp.get('lines', 0)} lines -> "
             f"{len(trace)} events in {out}"]
    if len(trace):
        kinds = trace.events["kind"].value_counts()
        kinds = kinds[kinds > 0]
        lines.append("  events: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    cpus = meta.host.get("online_cpus") or []
    if cpus:
        from pkstrace.schema import format_cpulist
        iso = meta.host.get("isolated_cpus") or []
        lines.append(f"  cpus: {format_cpulist(cpus)}"
                     + (f", isolated {format_cpulist(iso)}" if iso else ""))
    if meta.unmodeled_events:
        lines.append("  not modeled (kept as counts): " + ", ".join(
            f"{k} {v}" for k, v in sorted(meta.unmodeled_events.items())))
    if meta.unparsed_lines:
        lines.append("  lines not understood: " + ", ".join(
            f"{k} {v}" for k, v in sorted(meta.unparsed_lines.items())))
    other = {k: imp.get(k, 0) for k in ("header_lines", "stack_lines", "blank_lines")}
    if any(other.values()):
        lines.append("  skipped: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                for k, v in other.items() if v))
    if meta.lost_events:
        lines.append("  lost events (source): " + ", ".join(
            f"cpu {c}: {n}" for c, n in sorted(meta.lost_events.items())))
    return "\n".join(lines)
