"""`pkstrace emulate --backend bcc`: the real bcc backend recording inside the guest.

The stdlib-only initramfs cannot hold bcc (clang, LLVM, numpy, pandas, pyarrow), so
the guest mounts the host's /usr, /etc, this project tree (with its venv) and the
unpacked guest kernel (its headers) read-only over 9p, at their host paths, and runs
``pkstrace record --backend bcc`` chrooted there (see guest.main_bcc). The recorder
writes its .pkstrace into a writable 9p share of the run directory; the host then
adds what the tracefs path adds: the scenario, the module's counters (ground truth),
the console log. Kprobes or fentry on write_pkrs / update_global_pkrs are chosen by
``--func-probes`` as on any host (fentry on the module's functions needs its BTF:
see module.with_btf).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pkstrace.emulate import qemu
from pkstrace.emulate.kernel import EmulateError, GuestKernel, module_path
from pkstrace.emulate.scenarios import (
    RECORD_MSR,
    SCENARIOS,
    RunOptions,
    RunResult,
    _cpulist,
    _guest_kernel,
    _workdir,
    boot_with_retries,
    check_options,
    read_results,
    virtio_console_modules,
)

# Load order matters: each needs the ones before it.
NINEP_MODULES = (("netfs", "fs/netfs/netfs"), ("9pnet", "net/9p/9pnet"),
                 ("9pnet_virtio", "net/9p/9pnet_virtio"), ("9p", "fs/9p/9p"))
MIN_MEMORY_MB = 2048  # clang compiling the probes, plus pandas, in the guest
OUT_DIR = "guest-out"  # in the run directory, shared writable with the guest
GUEST_OUT = "/run/pkstrace-out"  # where the guest mounts it
FUNC_PROBES = ("auto", "kprobe", "fentry", "both")  # both: kprobe, then fentry
PROJECT = Path(__file__).resolve().parents[2]  # holds pkstrace/, probes/, .venv


def _kernel_tree(kern: GuestKernel) -> Path:
    """The unpacked kernel packages (boot/, lib/, usr/src/): one share for all."""
    if kern.headers is None or not kern.buildable:
        raise EmulateError(f"no kernel headers for {kern.release}: bcc in the guest "
                           "compiles against them (use Debian's kernel)")
    return kern.headers.parents[2]


def _common_headers(kern: GuestKernel) -> Path:
    assert kern.headers is not None
    common = kern.headers.with_name(kern.headers.name.removesuffix("-amd64") + "-common")
    return common if common.is_dir() else kern.headers


def host_root(kern: GuestKernel, work: Path) -> tuple[list[qemu.Share], dict[str, Any]]:
    """The 9p shares and the guest driver's host_root config (guest.mount_host_root)."""
    shares = [qemu.Share("usr", Path("/usr")), qemu.Share("etc", Path("/etc")),
              qemu.Share("project", PROJECT), qemu.Share("kernel", _kernel_tree(kern)),
              qemu.Share("out", work / OUT_DIR, writable=True)]
    prefix = Path(sys.prefix).resolve()
    if not (prefix.is_relative_to(PROJECT) or prefix.is_relative_to("/usr")):
        shares.append(qemu.Share("venv", prefix))
    links = []
    for name in ("bin", "sbin", "lib", "lib64"):
        p = Path("/") / name
        if p.is_symlink():  # merged /usr (Debian 12): /bin -> usr/bin
            links.append((str(p), os.readlink(p)))
        elif p.is_dir():
            shares.append(qemu.Share(name, p))
    modules = {}
    for name, rel in NINEP_MODULES:
        ko = module_path(kern, rel)
        if ko is None:
            raise EmulateError(f"{kern.release}: no {rel}.ko in the kernel package "
                               "(the bcc backend reaches the host's files over 9p)")
        modules[name] = ko
    mount_at = {"out": GUEST_OUT}
    cfg = {
        "modules": [n for n, _ in NINEP_MODULES],
        "links": links,
        "shares": [(s.tag, mount_at.get(s.tag, str(s.path)), s.writable) for s in shares],
        "kernel_build": str(kern.headers),
        "kernel_source": str(_common_headers(kern)),
        "_module_files": {n: str(p) for n, p in modules.items()},
    }
    return shares, cfg


def labels(func_probes: str) -> list[str]:
    """One recording per label, in this order, in one boot."""
    return ["kprobe", "fentry"] if func_probes == "both" else [func_probes]


def trace_name(label: str) -> str:
    return f"bcc-{label}.pkstrace"


def twin(output: Path, label: str) -> Path:
    """Where --func-probes both writes its second (fentry) trace: X.fentry.pkstrace."""
    return output.with_name(f"{output.stem}.{label}{output.suffix or '.pkstrace'}")


def recorder_env() -> list[str]:
    return [f"PYTHONPATH={PROJECT}", "HOME=/tmp", "PYTHONDONTWRITEBYTECODE=1",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=dumb"]


def recorder(label: str) -> list[str]:
    """argv of one recorder the guest runs (chrooted, host paths)."""
    argv = [sys.executable, "-m", "pkstrace", "record", "--backend", "bcc",
            "--mode", "events", "--msr", RECORD_MSR,
            "-o", f"{GUEST_OUT}/{trace_name(label)}", "--force", "--no-status", "-q"]
    if label != "auto":
        argv += ["--func-probes", label]
    return argv


def run(o: RunOptions, func_probes: str = "auto",
        log: Callable[[str], None] = print) -> RunResult:
    """Boot, run the scenario under the guest's bcc recorder, write the trace."""
    from pkstrace import tracefile
    from pkstrace.emulate.initramfs import run_archive
    from pkstrace.emulate.module import build_module

    if func_probes not in FUNC_PROBES:
        raise EmulateError(f"bad --func-probes {func_probes!r}")
    import importlib.util

    if importlib.util.find_spec("bcc") is None:
        raise EmulateError(f"--backend bcc: {sys.executable} cannot import bcc, and the "
                           "guest runs this very Python (install python3-bpfcc; use the "
                           "project venv: make setup)")
    iso = check_options(o)
    if o.output.exists() and not o.force:
        raise tracefile.TraceFileError(f"{o.output} exists (use --force to overwrite)")
    t_start = time.monotonic()
    kern = _guest_kernel(o, log)
    ko = build_module(kern, log=log)
    work = _workdir(o.scenario)
    (work / OUT_DIR).mkdir()
    shares, root_cfg = host_root(kern, work)
    modules = {n: Path(p) for n, p in root_cfg.pop("_module_files").items()}
    runs = labels(func_probes)
    params = (f"scenario={o.scenario} iterations={o.iterations} threads={o.threads} "
              "updater_cpu=0")
    cfg = {"backend": "bcc", "host_root": root_cfg, "recorder_env": recorder_env(),
           "recorders": [recorder(label) for label in runs],
           "ready_timeout_s": 600, "stop_timeout_s": 300, "settle_s": 0.3}
    initrd = run_archive(work / "initrd.cpio", ko, params, cfg, log=log,
                         extra_modules=modules, early_modules=virtio_console_modules(kern))
    timeout = o.timeout_s or len(runs) * (600 + 10 * o.cpus + 0.5 * o.iterations * o.cpus)
    mem = max(MIN_MEMORY_MB, o.mem_mb or qemu.memory_mb(o.cpus))
    append = qemu.kernel_cmdline(_cpulist(iso))
    log(f"emulate: booting {kern.release} with {o.cpus} vCPUs"
        f"{', isolated ' + _cpulist(iso) if iso else ''} (TCG), scenario {o.scenario}, "
        f"recording with bcc inside the guest (func probes: {func_probes})")
    def boot_once() -> qemu.BootResult:
        for label in runs:
            (work / OUT_DIR / trace_name(label)).unlink(missing_ok=True)
        return qemu.boot(kern.vmlinuz, initrd, o.cpus, append, work, timeout, mem, shares)

    boot, notes = boot_with_retries(
        boot_once, lambda: all("counters" in run_results(work, i) for i in range(len(runs))),
        log)
    record = {
        "backend": "bcc", "func_probes": func_probes, "runs": runs,
        "options": {"scenario": o.scenario, "cpus": o.cpus, "isolated": iso,
                    "iterations": o.iterations, "threads": o.threads},
        "kernel": kern.release, "append": append, "timeout_s": timeout,
        "boot": {"status": boot.status, "wall_s": round(boot.wall_s, 3), "panic": boot.panic,
                 "warnings": boot.warnings, "tcg_int3": boot.tcg_int3,
                 "returncode": boot.returncode, "command": boot.command},
        "notes": notes, "wall_s": round(time.monotonic() - t_start, 3),
    }
    (work / "run.json").write_text(json.dumps(record, indent=1))
    return build_trace(work, o.output, force=o.force, log=log)


def is_bcc_run(work: Path) -> bool:
    try:
        return json.loads((work / "run.json").read_text()).get("backend") == "bcc"
    except (OSError, ValueError, AttributeError):
        return False


def run_results(work: Path, run: int) -> dict[str, Any]:
    """The guest driver's results for recording ``run`` (lines without a run index,
    such as the facts, belong to every run)."""
    lines = []
    src = work / "results.jsonl"
    for line in (src.read_text(errors="replace").splitlines() if src.exists() else []):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("run", run) == run:
            lines.append(line)
    path = work / f"results-run{run}.jsonl"
    path.write_text("".join(f"{ln}\n" for ln in lines))
    return read_results(path)


def build_trace(work: Path, output: Path, force: bool = False,
                log: Callable[[str], None] = print) -> RunResult:
    """The guest recorder's trace(s) plus the run's scenario, ground truth and notes.
    With --func-probes both, the fentry recording goes to X.fentry.pkstrace."""
    from pkstrace import tracefile

    try:
        record = json.loads((work / "run.json").read_text())
        runs = list(record.get("runs") or [record["func_probes"]])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EmulateError(f"{work}: not a pkstrace emulate run directory ({e})") from None
    outputs = [output, *(twin(output, label) for label in runs[1:])]
    for out in outputs:
        if out.exists() and not force:
            raise tracefile.TraceFileError(f"{out} exists (use --force to overwrite)")
    results = [build_one(work, out, i, label, force) for i, (out, label)
               in enumerate(zip(outputs, runs, strict=True))]
    first = results[0]
    for label, res in zip(runs[1:], results[1:], strict=True):
        first.notes.append(f"the {label} recording of the same boot is {res.output} "
                           f"({res.status})")
        log(f"emulate: {label} recording of the same boot: {res.output}")
    return first


def build_one(work: Path, output: Path, run: int, label: str, force: bool) -> RunResult:
    """Recording ``run`` of the boot in ``work`` as the trace ``output``."""
    from pkstrace import schema, tracefile

    try:
        record = json.loads((work / "run.json").read_text())
        opts = record["options"]
        sc = SCENARIOS[opts["scenario"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EmulateError(f"{work}: not a pkstrace emulate run directory ({e})") from None
    bootrec = record["boot"]
    results = run_results(work, run)
    notes = list(record.get("notes", []))
    status = bootrec["status"]
    if bootrec["tcg_int3"] and "done" in results and status == "panic":
        own = [w for w in bootrec["warnings"] if not qemu.TCG_INT3_RE.search(w)]
        status = "bug" if own else "ok"
        notes.append("guest crashed after the run (TCG stale int3); the trace is complete")
    elif status in ("ok", "bug") and "done" not in results:
        status = "incomplete"
    if bootrec["panic"] and status not in ("ok", "bug"):
        notes.append(f"guest panicked: {bootrec['panic']}")
    notes += [f"guest console: {w}" for w in bootrec["warnings"][:5]]
    notes += [f"guest driver: {e}" for e in results["errors"]]
    rec_status = results.get("done", {}).get("recorder_status")
    if rec_status not in (None, 0):
        notes.append(f"guest recorder exited with status {rec_status}")
    notes += [f"guest {line}" for line in results.get("recorder", {}).get("lines", [])
              if "not attached" in line]

    console = work / "console.log"
    console_out = output.with_name(output.name + ".console.log")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(console, console_out)
    except OSError as e:
        raise EmulateError(f"cannot write {console_out}: {e.strerror}") from None
    guest_trace = work / OUT_DIR / trace_name(label)
    try:
        trace = tracefile.read_trace(guest_trace)
    except (OSError, tracefile.TraceFileError) as e:
        # No trace: say why in one line (the console log has the rest).
        last = results["errors"][-1:] or [str(e)]
        raise EmulateError(f"the guest's bcc recorder left no trace ({last[0]}); "
                           f"console log: {console_out}") from None
    counters = results.get("counters", {}).get("counters", {})
    ground_truth: dict[str, Any] = dict(counters)
    ground_truth["complete"] = bool(counters)
    meta = trace.meta
    iso = list(opts["isolated"])
    meta.host["emulated"] = True
    meta.host["pks"] = bool(counters.get("pks_cpuid", meta.host.get("pks", True)))
    meta.scenario = {
        "name": sc.name, "design": sc.summary, "cpus": opts["cpus"], "isolated": iso,
        "iterations": opts["iterations"], "threads": opts["threads"],
        "kernel": record["kernel"], "status": status, "expected": sc.expect,
        "wall_s": record["wall_s"], "boot_wall_s": bootrec["wall_s"],
        "run_s": results.get("ran", {}).get("run_s"),
        "attach_s": results.get("recording", {}).get("attach_s"),
        "mount_s": results.get("host_root", {}).get("mount_s"),
        "panic": bootrec["panic"], "warnings": bootrec["warnings"],
        "console_log": console_out.name, "run_dir": str(work), "qemu": bootrec["command"],
        "backend": "bcc", "func_probes": label,
    }
    meta.ground_truth = ground_truth
    meta.extra["guest_command"] = meta.command
    meta.command = ["pkstrace", "emulate", "--backend", "bcc", "--func-probes",
                    record["func_probes"], "--scenario", sc.name, "--cpus", str(opts["cpus"]),
                    "--isolated", _cpulist(iso), "--iterations", str(opts["iterations"]),
                    "--threads", str(opts["threads"])]
    meta.source = "emulated"
    meta.partial = meta.partial or status not in ("ok", "bug")
    meta.notes = [*meta.notes, *notes]
    tracefile.write_trace(output, schema.Trace(events=trace.events, meta=meta), force=force)
    return RunResult(output=output, status=status, expected=sc.expect,
                     console_log=console_out, wall_s=float(record["wall_s"]),
                     ground_truth=ground_truth, notes=notes)
