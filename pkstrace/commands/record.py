"""`pkstrace record`: trace this host's kernel live and analyse what it did."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

HELP = "record PKRS/MSR writes and cross-CPU calls on this host (root)"
DESCRIPTION = """\
Record MSR writes (msr:write_msr), cross-CPU function calls (csd:*), IPIs,
call-function interrupts and context switches on the running kernel, plus
kprobes on write_pkrs / update_global_pkrs where the kernel has them. Writes a
.pkstrace file and prints the same summary as `pkstrace replay`.

Stops when the duration ends, on Ctrl-C or SIGTERM, or when COMMAND exits (its
exit status becomes pkstrace's). Whatever stops it, every probe is detached,
the private tracefs instance is removed, and the trace holds what was recorded.

Backends: bcc (BPF, in-kernel counts and histograms with --mode counts), perf
(perf's Python bindings), tracefs (pure Python, the only one recording ftrace's
irqs-off / irq-context / preempt-depth flags). `auto` picks the first of bcc,
perf, tracefs that can run here, but tracefs first on a kernel that has
write_pkrs or a global-update function (preempt-count drift needs the flags),
and says why; `pkstrace doctor` shows what this host allows."""
DEFAULT_OUTPUT = "trace.pkstrace"
EXAMPLES = f"""\
examples:
  sudo pkstrace record -d 10                  # 10 s, all CPUs, to ./{DEFAULT_OUTPUT}
  sudo pkstrace record -o host.pkstrace -- ./my-test    # while a command runs
  sudo pkstrace record --backend tracefs -d 5 --force   # pure-Python backend, overwrite
  sudo pkstrace record --mode counts -d 60    # in-kernel counts + latency histograms (bcc)
  sudo pkstrace record --backend bcc --bpf-buffer perf -d 5   # perf rings, as before Linux 5.8
  sudo pkstrace record --backend bcc --bpf-attach tp -d 5   # classic tracepoint programs
  sudo pkstrace record --msr 0x6e1,0x830 -d 5 # keep only these MSRs' writes
  sudo pkstrace record --cpus 0-3 --isolated 2-3 -d 5   # events on CPUs 0-3; treat 2-3 as isolated
  sudo pkstrace record --symbols my_update_pkrs -d 5    # also probe this global-update function
  sudo pkstrace record --backend bcc --func-probes fentry -d 5   # write_pkrs via fentry (BTF)
  sudo pkstrace record --backend tracefs --csd-kprobes -d 5  # calls as kernels < 6.3 record them
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--duration", type=float, default=0.0, metavar="SECONDS",
                   help="stop after SECONDS (default: until Ctrl-C / COMMAND exits)")
    p.add_argument("-o", "--output", default=DEFAULT_OUTPUT, metavar="FILE",
                   help=f"trace file to write (default ./{DEFAULT_OUTPUT}; never overwritten "
                   "without --force)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--backend", default="auto", choices=("auto", "bcc", "perf", "tracefs"),
                   help="event source (default auto: bcc, else perf, else tracefs; "
                   "tracefs first on a PKS kernel)")
    p.add_argument("--mode", default="events", choices=("events", "counts"),
                   help="events: every event into the trace; counts: per-CPU counts and "
                   "log2 latency histograms kept in the kernel (bcc only)")
    p.add_argument("--msr", default="", metavar="LIST",
                   help="MSRs to record, e.g. 0x6e1,0x830, or 'all' (default: PKRS 0x6e1 "
                   "where the CPU has PKS, else all)")
    p.add_argument("--read-msr", action="store_true", help="also record msr:read_msr")
    p.add_argument("--cpus", default="", metavar="LIST",
                   help="record only events on these CPUs (default all)")
    p.add_argument("--isolated", default=None, metavar="LIST",
                   help="CPUs to treat as isolated in the analysis (default: the kernel's "
                   "isolated and nohz_full sets)")
    p.add_argument("--symbols", default="", metavar="LIST",
                   help="more global-update functions to probe (comma-separated; "
                   "prefix write: for write_pkrs-like ones)")
    p.add_argument("--func-probes", default="auto", choices=("auto", "kprobe", "fentry"),
                   help="how write_pkrs and the global-update functions are probed: "
                   "kprobe, fentry (BPF trampoline, bcc only, needs BTF: a module's "
                   "function needs the module's BTF), or auto (default: kprobes where the "
                   "kernel has them, else fentry where it is allowed)")
    p.add_argument("--no-sched", action="store_true", help="do not record sched:sched_switch")
    p.add_argument("--csd-kprobes", action="store_true",
                   help="record cross-CPU calls with kprobes on generic_exec_single / "
                   "smp_call_function_many_cond and the call-function vectors instead of "
                   "the csd/ipi tracepoints, as on kernels before 6.3 (done anyway where "
                   "csd:csd_queue_cpu is missing); needs kprobes and --backend tracefs")
    p.add_argument("--buffer-kb", type=int, default=8192, metavar="KB",
                   help="per-CPU buffer (default 8192): tracefs ring per CPU; bcc's "
                   "BPF ring buffers hold about KB x CPUs x 3 in all, its perf buffers "
                   "about KB x 3 per CPU (powers of two)")
    p.add_argument("--bpf-buffer", default="auto", choices=("auto", "ring", "perf"),
                   help="bcc events mode: stream through the BPF ring buffer (ring) or "
                   "per-CPU perf buffers (perf); default auto: ring where the kernel has it "
                   "(Linux >= 5.8), else perf")
    p.add_argument("--bpf-attach", default="auto", choices=("auto", "raw", "tp"),
                   help="bcc: raw tracepoint programs (raw: an interrupt's event is not "
                   "lost while another of our programs runs on that CPU) or classic "
                   "tracepoint programs (tp); default auto: raw where the kernel has them "
                   "(Linux >= 4.17) but sched_switch (interrupts are off there, and its "
                   "raw program costs more), else tp; a raw program that fails to attach "
                   "falls back to tp (the trace's probe status says so)")
    status = p.add_mutually_exclusive_group()
    status.add_argument("--status", dest="status", action="store_true", default=None,
                        help="live status line on stderr (default: when stderr is a tty)")
    status.add_argument("--no-status", dest="status", action="store_false")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary at the end")
    p.add_argument("workload_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="command to run while recording")


def _cpus(text: str, what: str) -> list[int]:
    from pkstrace import schema
    from pkstrace.errors import InputError

    try:
        return schema.parse_cpulist(text)
    except ValueError as e:
        raise InputError(f"{what}: {e}") from None


def _msrs(text: str) -> list[int] | None:
    from pkstrace.errors import InputError

    text = text.strip().lower()
    if not text:
        return None
    if text == "all":
        return []
    try:
        return [int(x, 0) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--msr: bad MSR list {text!r} (want e.g. 0x6e1,0x830 or all)") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pkstrace import schema
    from pkstrace.backends import checks, hostfacts, select
    from pkstrace.backends.base import RecordOptions, plan_probes
    from pkstrace.backends.symbols import function_names
    from pkstrace.errors import InputError, PrivilegeError
    from pkstrace.record import record

    command = list(args.workload_command or [])
    if command and command[0] == "--":
        command = command[1:]
    if args.duration < 0:
        raise InputError("--duration must be >= 0")
    if os.geteuid() != 0:
        c = checks.check_root()
        raise PrivilegeError(f"{c.detail}; run: {c.fix} (without root: replay, report, "
                             "import, export and emulate work)")
    out = Path(args.output)
    try:
        exists = out.exists()
    except OSError as e:
        raise InputError(f"{out}: {e.strerror}") from None
    if exists and not args.force:
        raise InputError(f"{out} exists (use --force to overwrite, or -o FILE)")
    cpus = _cpus(args.cpus, "--cpus") or None
    online = hostfacts.online_cpus()
    if cpus and not set(cpus) <= set(online):
        raise InputError(f"--cpus: CPUs {sorted(set(cpus) - set(online))} are not online "
                         f"(online: {schema.format_cpulist(online)})")
    opts = RecordOptions(msrs=_msrs(args.msr), read_msr=args.read_msr, cpus=cpus,
                         symbols=[s.strip() for s in args.symbols.split(",") if s.strip()],
                         sched_switch=not args.no_sched, mode=args.mode,
                         buffer_kb=args.buffer_kb, csd_kprobes=args.csd_kprobes,
                         func_probes=args.func_probes)
    name, why = select.choose(args.backend, args.mode)
    if args.bpf_buffer != "auto" and (name != "bcc" or args.mode != "events"):
        raise InputError(f"--bpf-buffer {args.bpf_buffer}: only for --backend bcc in "
                         f"--mode events (this is {name}, --mode {args.mode})")
    if args.bpf_attach != "auto" and name != "bcc":
        raise InputError(f"--bpf-attach {args.bpf_attach}: only for --backend bcc "
                         f"(this is {name})")
    remove_dead_recorders_leftovers()

    host = hostfacts.collect()
    if args.isolated is not None:
        iso = _cpus(args.isolated, "--isolated")
        host["isolated_cpus"] = iso
        host["nohz_full_cpus"] = []
        host["isolated_source"] = "--isolated"
    if args.func_probes == "fentry" and name != "bcc":
        raise InputError(f"--func-probes fentry: only the bcc backend loads fentry "
                         f"programs (this is {name})")
    fentry_ok = name == "bcc" and args.func_probes != "kprobe" and checks.fentry_allowed()[0]
    specs, absent = plan_probes(opts, function_names(), checks.kprobes_available(),
                                bool(host.get("pks")), backend=name,
                                fentry_available=fentry_ok)
    meta = schema.TraceMeta(host=host)
    meta.probes = [a.to_json() for a in absent]
    meta.command = ["pkstrace", "record", *sys.argv[2:]] if sys.argv[1:2] == ["record"] \
        else ["pkstrace", "record"]
    meta.extra["record"] = {"backend_choice": why, "cpus": cpus or online,
                            "msrs": list(opts.msrs) if opts.msrs is not None else None,
                            "workload": command}
    if opts.msrs is None:
        meta.notes.append("MSR filter: " + ("PKRS (0x6e1)" if host.get("pks")
                                            else "every MSR (this CPU has no PKS)"))
    backend = select.create(name, specs, opts, bpf_buffer=args.bpf_buffer,
                            bpf_attach=args.bpf_attach)
    target = " -- " + shlex.join(command) if command else ""
    buffer_why = getattr(backend, "buffer_why", "") if args.mode == "events" else ""
    print(f"pkstrace record: {why}" + (f"; BPF buffer {buffer_why}" if buffer_why else ""),
          file=sys.stderr)

    def on_attached(results: list[Any]) -> None:
        by_reason: dict[str, list[str]] = {}
        for r in [*absent, *results]:
            if not r.attached:
                by_reason.setdefault(r.reason, []).append(r.name)
        for reason, names in by_reason.items():
            print(f"pkstrace record: not attached ({reason}): {', '.join(names)}",
                  file=sys.stderr)
        n = sum(r.attached for r in results)
        print(f"pkstrace record: {n} probes attached; recording to {out}{target}"
              + ("" if command or args.duration else "; Ctrl-C to stop"),
              file=sys.stderr, flush=True)

    res = record(backend, out, meta, duration=args.duration, command=command,
                 force=args.force, status=args.status, on_attached=on_attached)
    lost = sum(res.lost.values())
    what = f"{res.rows} events"
    if args.mode == "counts":
        counted = sum(r["count"] for r in meta.aggregates.get("per_cpu", []))
        what = f"{counted} events counted in the kernel"
    print(f"pkstrace record: {what} in {res.elapsed_s:.1f} s "
          f"({res.stop_reason}), {lost} lost, written to {res.path}", file=sys.stderr)
    if not args.quiet:
        print_summary(res.path)
    return res.exit_status


def remove_dead_recorders_leftovers() -> None:
    """What a recorder killed with SIGKILL left (its tracefs instance, kprobe events):
    removed here as `pkstrace doctor --cleanup` would; only pkstrace-<pid> names of
    pids that no longer run, nothing of other tools or of live recorders."""
    from pkstrace.backends.tracefs import leftovers, remove_leftover

    for kind, name, pid, alive in leftovers():
        if alive:
            continue
        err = remove_leftover(kind, name)
        print("pkstrace record: " + (f"could not remove {kind} {name}: {err}" if err else
                                     f"removed {kind} {name} left by dead recorder {pid}"),
              file=sys.stderr)


def print_summary(path: Any) -> None:
    """The same summary as `pkstrace replay` (falls back to counts without the analysis)."""
    from pkstrace import tracefile

    trace = tracefile.read_trace(path)
    if trace.meta.mode == "counts":
        # Counts mode keeps aggregates, not rows: show them (the event analysis
        # would find nothing to analyse).
        from pkstrace.record import render_aggregates

        print(render_aggregates(trace.meta.aggregates))
        return
    try:
        from pkstrace.analysis import analyse
        from pkstrace.reports.terminal import render
    except ImportError:
        from pkstrace.record import counts_table

        print(counts_table(trace))
        return
    try:
        findings = analyse(trace)
    except ImportError:
        from pkstrace.record import counts_table

        print(counts_table(trace))
        return
    text = render(findings)
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
