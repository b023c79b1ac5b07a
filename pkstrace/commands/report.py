"""`pkstrace report`: one trace (or two, compared) -> a self-contained HTML dashboard."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "write an interactive HTML dashboard of a trace, or compare two traces"
DESCRIPTION = """\
Analyse a trace (.pkstrace, or an ftrace / perf script text capture) and write
one self-contained HTML file: plotly.js is embedded, the page needs no network.

Views: summary (host, window, each finding with severity and count); per-CPU
activity heatmaps (MSR writes, cross-CPU calls; isolated CPUs outlined);
redundant MSR writes by task and callsite; write_pkrs calls vs cache hits vs
MSR writes; cross-CPU call latency (log axis) by target CPU, by function, idle
vs busy; global-update episodes and their stalls, projected to 64/256/1024 CPUs
for serial, broadcast and lazy designs; isolation violations (tracer-induced
apart); preempt-count drift; lost updates.

With two traces (A B) the page starts with the differences in numbers
(e.g. "remote cross-CPU calls: 2,800 -> 0") and shows each view side by side.
Tables sort on click or Enter; j/k move between views.
"""
EXAMPLES = """\
examples:
  pkstrace report host.pkstrace -o host.html
  pkstrace report trace.txt --isolated 6-7 -o trace.html     # ftrace text capture
  pkstrace report v3.pkstrace lazy.pkstrace -o compare.html  # A vs B
  pkstrace report host.pkstrace --calibration calib.json -o host.html
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("traces", nargs="+", metavar="TRACE",
                        help="trace to report on; give two to compare (A B)")
    parser.add_argument("-o", "--output", required=True, metavar="HTML",
                        help="HTML file to write")
    parser.add_argument("--calibration", metavar="FILE",
                        help="calibration from `pkstrace bench ipi -o FILE`, for the "
                             "stall projection")
    parser.add_argument("--isolated", metavar="CPULIST",
                        help="treat these CPUs as isolated (overrides the trace's host facts)")
    parser.add_argument("--label", action="append", metavar="NAME",
                        help="name of a trace in the page (once per trace; default: file name)")
    parser.add_argument("--title", help="page title")
    parser.add_argument("-f", "--force", action="store_true",
                        help="overwrite the output file if it exists")


# Loading helpers, shared with `pkstrace export` (imports stay inside the functions so
# that `pkstrace -h` stays instant).

def parse_isolated(text: str | None) -> list[int] | None:
    """--isolated CPULIST -> CPU numbers (None: use the trace's host facts)."""
    if text is None:
        return None
    from pkstrace.errors import InputError
    from pkstrace.schema import parse_cpulist

    try:
        return parse_cpulist(text)
    except ValueError as e:
        raise InputError(f"--isolated {text!r}: {e}") from None


def check_output(path: str, force: bool) -> Path:
    """Refuse to overwrite (unless --force) or to write where no directory exists."""
    from pkstrace.errors import InputError

    out = Path(path)
    if out.is_dir():
        raise InputError(f"{out} is a directory")
    if out.exists() and not force:
        raise InputError(f"{out} exists (use --force to overwrite)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {out}: directory {parent} does not exist")
    return out


def analyse_file(path: str, isolated: list[int] | None,
                 calibration: str | None) -> tuple[Any, Any]:
    """Open a trace (any format open_trace knows) and analyse it: (trace, findings)."""
    from pkstrace.analysis import analyse
    from pkstrace.analysis.projection import load_calibration
    from pkstrace.importers import open_trace

    calib = load_calibration(calibration) if calibration else None
    trace = open_trace(path)
    return trace, analyse(trace, isolated=isolated, calibration=calib)


def write_text(path: Path, text: str) -> None:
    """Write atomically: a temporary file beside the target, renamed into place
    (created with O_EXCL, written through its descriptor; under sudo owned by the
    invoking user: tracefile.create_output)."""
    import contextlib
    import os

    from pkstrace.errors import PkstraceError
    from pkstrace.tracefile import create_output, finish_output

    f, tmp = create_output(path, "w")
    try:
        f.write(text)
        finish_output(f, tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            f.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PkstraceError(f"cannot write {path}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> int:
    from pkstrace.errors import InputError
    from pkstrace.reports import html

    if len(args.traces) > 2:
        raise InputError(f"give one trace, or two to compare, not {len(args.traces)}")
    labels = args.label or [Path(t).name for t in args.traces]
    if len(labels) != len(args.traces):
        raise InputError(f"{len(labels)} --label for {len(args.traces)} traces")
    if len(args.traces) == 2 and labels[0] == labels[1]:
        labels = [f"A: {labels[0]}", f"B: {labels[1]}"]
    out = check_output(args.output, args.force)
    isolated = parse_isolated(args.isolated)
    runs = []
    for path, label in zip(args.traces, labels, strict=True):
        _, findings = analyse_file(path, isolated=isolated, calibration=args.calibration)
        runs.append((label, findings))
    page = html.render(runs, title=args.title)
    write_text(out, page)
    print(f"wrote {out} ({len(page.encode()) / 1e6:.1f} MB)")
    return 0
