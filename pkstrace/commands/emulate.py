"""`pkstrace emulate`: run the PKS code paths on a real kernel in QEMU and record them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pkstrace.errors import InputError

HELP = "boot an emulated PKS host (QEMU), run a global-update scenario, record it"
DESCRIPTION = """\
Boot Debian's 6.12 kernel under QEMU (TCG, -cpu max: a vCPU with PKS) with N CPUs
and the isolated CPUs asked for, load pkstrace's PKS test module, run one global-
update design (a scenario), record it with pkstrace's tracefs recorder inside the
guest, and write a .pkstrace whose metadata holds the guest's host facts and the
module's own counters (the ground truth). Then print the replay summary.

The first run downloads the kernel and headers with apt-get download (~120 MB) and
builds the module and initramfs; all of it is cached in $PKSTRACE_CACHE or
~/.cache/pkstrace, so later runs start in seconds. Root is not needed.
A guest that panics, warns or hangs is a result: the console log is written beside
the trace (FILE.console.log) and the exit status is 1 unless the scenario expects it.
"""
EXAMPLES = """\
examples:
  pkstrace emulate --list                                   # the scenarios, explained
  pkstrace emulate --cpus 8 --isolated 6-7 --scenario v3 -o v3.pkstrace
  pkstrace emulate --cpus 8 --isolated 6-7 --scenario lazy -o lazy.pkstrace
  pkstrace emulate --cpus 8 --isolated 6-7 --scenario v3-race --threads 3 -o race.pkstrace
  pkstrace emulate --cpus 4 --isolated 3 --scenario v3-raw -o raw.pkstrace  # panics
  pkstrace emulate --scenario v3 --kernel ./linux-image-6.12.99-amd64-unsigned.deb -o x.pkstrace
  pkstrace emulate --cpus 4 --scenario v3 --csd-kprobes -o old.pkstrace  # as on Linux < 6.3
  pkstrace emulate --cpus 4 --scenario v3 --csd-kprobes both -o v3k.pkstrace
                                    # + v3k.tracepoints.pkstrace: the same run, csd tracepoints
  pkstrace emulate --kernel linux-image-6.1.0-56-amd64-unsigned_6.1.192-2_amd64.deb \\
      --cpus 4 --scenario broadcast -o bc61.pkstrace    # Linux 6.1: no csd tracepoints
  pkstrace emulate --cpus 4 --isolated 3 --scenario v3 --backend bcc -o v3bcc.pkstrace
  pkstrace emulate --cpus 4 --scenario v3 --backend bcc --func-probes fentry -o f.pkstrace
  pkstrace emulate --cpus 4 --scenario v3 --backend bcc --func-probes both -o b.pkstrace
                                    # + b.fentry.pkstrace: the scenario again, fentry probes
  pkstrace replay v3.pkstrace --json                        # analyse it again
"""


def _int_range(lo: int, hi: int, what: str):  # noqa: ANN202 - argparse type factory
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be between {lo} and {hi}")
        return v
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list", action="store_true", help="describe the scenarios and exit")
    p.add_argument("--scenario", default="v3", metavar="NAME",
                   help="v3, v3-race, v3-raw, broadcast, lazy, housekeeping (default v3)")
    p.add_argument("--cpus", type=_int_range(2, 64, "--cpus"), default=4, metavar="N",
                   help="guest vCPUs (default 4)")
    p.add_argument("--isolated", default="", metavar="LIST",
                   help="CPUs given isolcpus= and nohz_full=, e.g. 6-7 (not CPU 0)")
    p.add_argument("--iterations", type=_int_range(1, 4096, "--iterations"), default=10,
                   metavar="K", help="global updates to issue (default 10)")
    p.add_argument("--threads", type=_int_range(0, 63, "--threads"), default=3, metavar="T",
                   help="writer threads calling write_pkrs(), isolated CPUs first (default 3)")
    p.add_argument("-o", "--output", metavar="FILE", help="trace to write (.pkstrace)")
    p.add_argument("--kernel", metavar="DEB|BZIMAGE",
                   help="boot this kernel instead of Debian's newest 6.12 (the module needs "
                        "matching headers)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the guest after this long (default scales with --cpus)")
    p.add_argument("--memory", type=_int_range(256, 65536, "--memory"), default=None,
                   metavar="MB", help="guest memory (default max(1024, 640 + 48 x cpus))")
    p.add_argument("--rebuild", metavar="RUNDIR",
                   help="rebuild the trace from a kept run directory (no boot)")
    p.add_argument("--csd-kprobes", nargs="?", const="only", default="",
                   choices=("only", "both"), metavar="only|both",
                   help="record cross-CPU calls as on a kernel before 6.3: kprobes on "
                        "generic_exec_single / smp_call_function_many_cond and the "
                        "call-function vectors instead of the csd/ipi tracepoints; 'both' "
                        "records both paths in one run and also writes "
                        "FILE-stem.tracepoints.pkstrace. A guest kernel before 6.3 "
                        "(e.g. --kernel linux-image-6.1.*.deb) gets 'only' by itself")
    p.add_argument("--backend", default="tracefs", choices=("tracefs", "bcc"),
                   help="recorder inside the guest: tracefs (default; stdlib only, ftrace "
                        "flags, survives a panic) or bcc (the real `pkstrace record "
                        "--backend bcc`, run from the host's files over 9p; needs "
                        "python3-bpfcc on this host; slower start)")
    p.add_argument("--func-probes", default="auto",
                   choices=("auto", "kprobe", "fentry", "both"),
                   help="with --backend bcc: how write_pkrs / update_global_pkrs are "
                        "probed (record --func-probes; default auto); 'both' records the "
                        "scenario twice in one boot, with kprobes into FILE and with "
                        "fentry into FILE-stem.fentry.pkstrace")
    p.add_argument("-f", "--force", action="store_true", help="overwrite FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="no replay summary")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def outcome_lines(res: Any) -> list[str]:
    gt = res.ground_truth
    lines = [f"emulate: guest outcome {res.status} (expected {res.expected}) in "
             f"{res.wall_s:.1f} s; trace {res.output}, console log {res.console_log}"]
    if gt.get("complete"):
        lines.append(
            "emulate: module counters: {updates} updates, {remote_calls} remote calls "
            "({isolated_hits} to isolated CPUs), {broadcasts} broadcasts, "
            "{write_pkrs_calls} write_pkrs ({cache_hits} cache hits), "
            "{lost_updates} lost updates, preempt drift per update {drift}".format(
                drift=gt.get("preempt_drift_min"), **{k: gt.get(k) for k in (
                    "updates", "remote_calls", "isolated_hits", "broadcasts",
                    "write_pkrs_calls", "cache_hits", "lost_updates")}))
    else:
        lines.append(f"emulate: no module counters (the guest did not finish); "
                     f"{gt.get('updates_logged', 0)} updates logged on the console")
    lines += [f"emulate: note: {n}" for n in res.notes]
    return lines


def run(args: argparse.Namespace) -> int:
    from pkstrace.emulate import scenarios

    if args.list:
        sys.stdout.write(scenarios.describe())
        return 0
    if not args.output:
        raise InputError("-o FILE is required (or --list)")
    out = Path(args.output)
    if args.func_probes != "auto" and args.backend != "bcc":
        raise InputError("--func-probes needs --backend bcc (the tracefs recorder in the "
                         "guest uses kprobe_events)")
    if args.rebuild:
        from pkstrace.emulate import bcc_run

        build = bcc_run.build_trace if bcc_run.is_bcc_run(Path(args.rebuild)) \
            else scenarios.build_trace
        res = build(Path(args.rebuild), out, force=args.force, log=_log)
    else:
        opts = scenarios.RunOptions(
            scenario=args.scenario, cpus=args.cpus, isolated=args.isolated,
            iterations=args.iterations, threads=args.threads, output=out,
            kernel=args.kernel, timeout_s=args.timeout, mem_mb=args.memory, force=args.force,
            csd_kprobes=args.csd_kprobes)
        if args.backend == "bcc":
            from pkstrace.emulate import bcc_run

            if args.csd_kprobes:
                raise InputError("--csd-kprobes is for the tracefs recorder (--backend "
                                 "tracefs)")
            res = bcc_run.run(opts, func_probes=args.func_probes, log=_log)
        else:
            res = scenarios.run(opts, log=_log)
    for line in outcome_lines(res):
        _log(line)
    if not args.quiet:
        print_summary(res.output)
    return 0 if res.as_expected else 1


def print_summary(path: Path) -> None:
    """The replay summary, then the module's counters beside the analysis's figures."""
    from pkstrace import tracefile
    from pkstrace.analysis import analyse
    from pkstrace.emulate import truth
    from pkstrace.reports.terminal import render

    trace = tracefile.read_trace(path)
    findings = analyse(trace)
    text = render(findings)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.write("\nground truth: the PKS module's counters vs the analysis\n")
    sys.stdout.write(truth.table(truth.compare(findings, trace.meta.ground_truth)))
    sys.stdout.flush()
