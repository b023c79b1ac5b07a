"""`pkstrace doctor`: what this host allows, and the command that fixes each gap."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "check what this host allows (root, tracefs, BPF, kprobes, tracepoints, PKS, ...)"
DESCRIPTION = """\
Check what `pkstrace record` can use on this host: root, tracefs, BPF, BTF,
kprobes, fentry (really loaded: bcc's support_kfunc() can say yes where loading
fails), kernel headers for bcc, the bcc and perf Python modules, bpftool, each
tracepoint, write_pkrs and the global-update functions, PKS in the CPU, isolated
CPUs, and leftovers of recorders that died. Prints the exact fix for each
missing item, then which backend `record --backend auto` would pick.

Exit status: 0 if some backend can record here, 1 if none can."""
EXAMPLES = """\
examples:
  sudo pkstrace doctor              # the table and the backend auto would pick
  sudo pkstrace doctor --json       # the same as JSON
  sudo pkstrace doctor --cleanup    # remove instances / kprobes of dead recorders
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--cleanup", action="store_true",
                   help="remove tracefs instances (pkstrace-<pid>) and kprobe groups "
                   "(pkstrace_<pid>) whose recorder is gone; nothing else is touched")


def run(args: argparse.Namespace) -> int:
    from pkstrace.backends import checks, select
    from pkstrace.backends.tracefs import leftovers, remove_leftover
    from pkstrace.errors import KernelFeatureError, PrivilegeError

    if args.cleanup:
        if checks.check_root().status != checks.OK:
            raise PrivilegeError("--cleanup needs root; run: sudo pkstrace doctor --cleanup")
        removed, problems = [], []
        for kind, name, pid, alive in leftovers():
            if alive:
                print(f"kept {kind} {name}: recorder pid {pid} is running")
                continue
            err = remove_leftover(kind, name)
            (problems if err else removed).append(err or f"{kind} {name}")
        for r in removed:
            print(f"removed {r}")
        for p in problems:
            print(f"could not remove: {p}", file=sys.stderr)
        if not removed and not problems:
            print("nothing to clean up")
        return 1 if problems else 0

    results = checks.all_checks()
    try:
        backend, why = select.choose("auto", "events")
    except KernelFeatureError as e:
        backend, why = "", str(e)
    if args.json:
        print(json.dumps({"checks": [c.to_json() for c in results],
                          "auto_backend": backend, "auto_reason": why}, indent=1))
        return 0 if backend else 1
    w = max(len(c.name) for c in results)
    mark = {checks.OK: "ok", checks.MISSING: "MISSING", checks.INFO: "-"}
    print(f"{'check':<{w}}  {'status':<7}  detail")
    for c in results:
        print(f"{c.name:<{w}}  {mark.get(c.status, c.status):<7}  {c.detail}")
        if c.fix and c.status != checks.OK:
            print(f"{'':<{w}}  {'':<7}  fix: {c.fix}")
    print()
    print(f"record --backend {why}" if backend else f"record: {why}")
    return 0 if backend else 1
