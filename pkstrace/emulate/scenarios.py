"""Scenarios and the whole emulated run: kernel -> module -> initramfs -> QEMU -> trace.

Each scenario is one global-update design of the PKS test module
(probes/pks_module/pks_test.c). A run boots a guest with N CPUs and the isolated
CPUs asked for, records the scenario with the project's tracefs recorder inside
the guest, and writes a .pkstrace whose metadata carries the guest's host facts,
the scenario and the module's counters (``meta.ground_truth``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkstrace.emulate import qemu
from pkstrace.emulate.kernel import EmulateError, GuestKernel, cache_dir

# What the guest records: PKRS writes, csd, ipi and sched_switch tracepoints, and
# kprobes on the module's functions (signatures fixed in pks_test.c). Not the
# irq_vectors ones: they sit in the call-function IPI entry that text patching
# itself runs through, the spot where TCG shows stale int3s (qemu.TCG_INT3_RE);
# csd_function_entry/exit carry the same timing.
RECORD_EVENTS: tuple[str, ...] = (
    "msr:write_msr",
    "csd:csd_queue_cpu",
    "csd:csd_function_entry",
    "csd:csd_function_exit",
    "ipi:ipi_send_cpu",
    "ipi:ipi_send_cpumask",
    "sched:sched_switch",
)
RECORD_KPROBES: tuple[str, ...] = (
    "write_pkrs:write_pkrs new=%di:x32",
    "update_global_pkrs:update_global_pkrs pkey=%di:s32 prot=%si:x64",
)
RECORD_MSR = "0x6e1"
MAX_CPUS = 64
KEEP_RUNS = 8  # run directories kept under the cache's runs/
ATTEMPTS = 3  # boots per run while an emulator artefact spoils it (boot_with_retries)


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    detail: str
    expect: str  # outcomes that mean "as expected", "|"-separated: "ok", "panic|bug"


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("v3", "the reviewed design: serial wrmsrl_on_cpu() walk, preempt imbalance",
             "write_pkrs() uses get_cpu_ptr()/put_cpu_ptr(); update_global_pkrs() walks the "
             "online CPUs, stores into each CPU's cache with per_cpu_ptr() + put_cpu_ptr() "
             "(one preempt_enable() too many per CPU) and calls wrmsrl_on_cpu() on each in "
             "turn. The walk starts with preempt_count_add(nr_cpus) of headroom so the guest "
             "survives; the depth still falls by one per CPU in the trace. Writers run "
             "between updates. Expect: remote calls = updates x (cpus-1), every isolated "
             "CPU hit by every update, drift in every update.", "ok"),
    Scenario("v3-race", "v3 with local writers running during the walk: lost updates",
             "As v3, but the writer threads switch between two PKRS values (as context "
             "switches would) while the walk stores into their caches; the IPI after a "
             "store into a writer's cache waits (at most 5 ms) until that writer has hit "
             "the new value in its cache while its MSR still held its other value. Cache "
             "and MSR diverge: about one lost update per writer CPU per update. The module "
             "counts stale cache hits and remote writes overwritten mid-call, the analysis "
             "must find as many.", "ok"),
    Scenario("v3-raw", "v3 without headroom: the preempt count goes negative (BUG/panic)",
             "The v3 walk exactly as reviewed, with no compensation: the caller's preempt "
             "count goes negative. Measured on 6.12 under TCG: 'BUG: scheduling while "
             "atomic' at the updater's next sleep, once per update (the scheduler then "
             "resets the count); a walk that allocates while the count is negative panics "
             "instead (recorded in ENVIRONMENT.md). Either is the expected result; "
             "events leave the guest as produced and the console log is kept.",
             "panic|bug"),
    Scenario("broadcast", "one on_each_cpu_mask() per update; each CPU updates its own cache",
             "update_global_pkrs() sends one broadcast to all online CPUs; the handler "
             "writes the CPU's own cache and MSR. Expect: one broadcast per update, no drift, "
             "no lost updates; isolated CPUs are still interrupted.", "ok"),
    Scenario("lazy", "no IPIs: each CPU applies the new value at its next write_pkrs()",
             "update_global_pkrs() bumps a generation number only; write_pkrs() sees it and "
             "rewrites the MSR. Expect: zero remote calls and zero isolation violations "
             "from the design (the tracer's own attach still patches text on every CPU).",
             "ok"),
    Scenario("housekeeping", "broadcast to housekeeping CPUs; isolated CPUs apply lazily",
             "on_each_cpu_mask() to the online CPUs that are not isolated; isolated CPUs "
             "pick the value up at their next write_pkrs(). Expect: no calls land on "
             "isolated CPUs.", "ok"),
)}


@dataclass
class RunOptions:
    scenario: str
    cpus: int = 4
    isolated: str = ""
    iterations: int = 10
    threads: int = 3
    output: Path = Path("emulated.pkstrace")
    kernel: str | None = None  # --kernel DEB|BZIMAGE
    timeout_s: float | None = None
    mem_mb: int | None = None
    force: bool = False
    # "": csd/ipi tracepoints; "only": record cross-CPU calls as on a kernel before
    # 6.3 (kprobes + call-function vectors, see backends/base.py plan_csd_fallback);
    # "both": both paths in one run, written as two traces (see build_trace)
    csd_kprobes: str = ""


@dataclass
class RunResult:
    output: Path | None
    # qemu.BootResult status ("ok", "bug", "panic", "timeout", "error", "stall"), or
    # "incomplete" when the guest stopped before reporting done
    status: str
    expected: str  # "|"-separated outcomes
    console_log: Path
    wall_s: float
    ground_truth: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def as_expected(self) -> bool:
        return self.status in self.expected.split("|")


def describe() -> str:
    """Text for ``pkstrace emulate --list``."""
    lines = []
    for s in SCENARIOS.values():
        lines.append(f"{s.name:<13} {s.summary}")
        words, cur = s.detail.split(), "             "
        for w in words:
            if len(cur) + len(w) + 1 > 96:
                lines.append(cur.rstrip())
                cur = "             "
            cur += " " + w
        lines.append(cur.rstrip())
        lines.append(f"{'':14}expected outcome: {s.expect}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def check_options(o: RunOptions) -> list[int]:
    """Validate; return the isolated CPUs. Raises InputError with one line."""
    from pkstrace.errors import InputError
    from pkstrace.schema import parse_cpulist

    if o.scenario not in SCENARIOS:
        raise InputError(f"unknown scenario {o.scenario!r} (pkstrace emulate --list)")
    if not 2 <= o.cpus <= MAX_CPUS:
        raise InputError(f"--cpus must be between 2 and {MAX_CPUS}")
    try:
        iso = parse_cpulist(o.isolated)
    except ValueError as e:
        raise InputError(f"--isolated {o.isolated!r}: {e}") from None
    if any(c >= o.cpus for c in iso):
        raise InputError(f"--isolated {o.isolated}: the guest has CPUs 0-{o.cpus - 1}")
    if 0 in iso:
        raise InputError("--isolated must leave CPU 0: the updater and the recorder run there")
    if o.iterations < 1 or o.iterations > 4096:
        raise InputError("--iterations must be between 1 and 4096")
    if o.threads < 0:
        raise InputError("--threads must be >= 0")
    return iso


# The guest reaches the host through virtio-serial ports. Debian's 6.12 builds the
# drivers in; older kernels (6.1) have them as modules, loaded by /init in this order.
VIRTIO_CONSOLE_MODULES = ("drivers/virtio/virtio_ring", "drivers/virtio/virtio",
                          "drivers/virtio/virtio_pci_legacy_dev",
                          "drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci",
                          "drivers/char/virtio_console")


def virtio_console_modules(kern: GuestKernel) -> list[Path]:
    """The virtio console's modules where ``kern`` does not build it in (else [])."""
    from pkstrace.emulate.kernel import module_path

    try:
        config = kern.config.read_text() if kern.config else ""
    except OSError:
        config = ""
    if "CONFIG_VIRTIO_CONSOLE=m" not in config:
        return []
    return [p for rel in VIRTIO_CONSOLE_MODULES if (p := module_path(kern, rel)) is not None]


def record_probes(csd_kprobes: str, release: str) -> tuple[list[str], list[str]]:
    """Tracepoints and kprobe specs the guest records (``--csd-kprobes`` mode)."""
    from pkstrace.backends import base

    if csd_kprobes not in ("", "only", "both"):
        raise ValueError(f"bad csd_kprobes mode {csd_kprobes!r}")
    events, kprobes = list(RECORD_EVENTS), list(RECORD_KPROBES)
    if csd_kprobes:
        if csd_kprobes == "only":
            events = [e for e in events if not e.startswith(base.CSD_FALLBACK_REPLACES)]
        events += list(base.CALLFUNC_TRACEPOINTS)
        single, many = base.csd_kprobe_fetchargs(release)
        kprobes += [f"{base.CSD_QUEUE_FUNC}:{base.CSD_QUEUE_FUNC} {single}",
                    f"{base.CSD_MANY_FUNCS[0]}:{base.CSD_MANY_FUNCS[0]} {many}"]
    return events, kprobes


def _cpulist(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def _guest_kernel(o: RunOptions, log: Callable[[str], None]) -> GuestKernel:
    from pkstrace.emulate import kernel as k

    return k.kernel_from_path(o.kernel) if o.kernel else k.ensure_debian_kernel(log=log)


def _workdir(name: str) -> Path:
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    # Keep the last few runs for post-mortems (--rebuild); never touch a run that
    # may still be going on in another process (younger than an hour).
    old = sorted(runs.iterdir(), key=lambda p: p.stat().st_mtime)
    for p in old[:-KEEP_RUNS]:
        if time.time() - p.stat().st_mtime > 3600:
            shutil.rmtree(p, ignore_errors=True)
    d = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{os.getpid()}"
    d.mkdir()
    return d


def boot_with_retries(boot_once: Callable[[], qemu.BootResult], counted: Callable[[], bool],
                      log: Callable[[str], None]) -> tuple[qemu.BootResult, list[str]]:
    """Boot up to ATTEMPTS times while the guest fails by an emulator artefact outside
    the scenario: a stall while the tracer attaches or removes its probes (boot()'s
    give_up), or TCG's stale int3 before the module's counters were read
    (``counted``). Returns the last boot and a note per retry."""
    notes: list[str] = []
    for attempt in range(1, ATTEMPTS + 1):
        boot = boot_once()
        if attempt == ATTEMPTS:
            break
        if boot.status == "stall":
            notes.append(f"attempt {attempt}: guest stalled (soft lockup / RCU stall) while "
                         "the tracer attached or removed its probes, outside the scenario; "
                         "booted again")
        elif boot.tcg_int3 and not counted():
            notes.append(f"attempt {attempt}: guest hit a stale int3 while the tracer patched "
                         "kernel text (TCG artefact); booted again")
        else:
            break
        log(f"emulate: {notes[-1]}")
    return boot, notes


def stalled_while_attaching(results: Path) -> Callable[[str], bool]:
    """boot()'s give_up: the guest console shows a soft lockup or an RCU stall while
    the recorder attaches its probes (the guest has said neither "recording" nor
    "ran") or removes them (after the module's counters, before "done"): no scenario
    code runs then. Seen on Debian's 6.1 under TCG with kprobes on the cross-CPU call
    functions (3 of 19 boots on 2026-11-26): the recorder hung in the kernel while arming
    or disarming them. A stall while the scenario runs is its result and is kept."""

    def give_up(console: str) -> bool:
        if not qemu.STALL_RE.search(console):
            return False
        kinds = []
        try:
            for line in results.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    kinds.append(rec.get("type"))
        except OSError:
            pass
        attaching = "recording" not in kinds and "ran" not in kinds
        detaching = "counters" in kinds and "done" not in kinds
        return attaching or detaching

    return give_up


def read_results(path: Path) -> dict[str, Any]:
    """The guest driver's JSON lines, by type (a torn last line is ignored)."""
    out: dict[str, Any] = {"errors": []}
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        kind = rec.pop("type", "")
        if kind == "error":
            out["errors"].append(rec.get("message", ""))
        elif kind:
            out[kind] = rec
    return out


_COMMENT_RE = re.compile(r"^# pkstrace-(probe|clock|lost|end): (.*)$", re.M)


def stream_meta(text: str) -> dict[str, Any]:
    """Metadata comment lines of the recorder's stream (see backends/tracefs.py)."""
    meta: dict[str, Any] = {"probes": []}
    for m in _COMMENT_RE.finditer(text):
        try:
            val = json.loads(m.group(2))
        except ValueError:
            continue
        if m.group(1) == "probe":
            meta["probes"].append(val)
        else:
            meta[m.group(1)] = val
    return meta


# What the guest driver reports, in order (guest.py), and what the guest was doing
# once it had reported each: where a guest that hung or crashed got to.
GUEST_STAGES: tuple[tuple[str, str], ...] = (
    ("", "booting the kernel or starting the guest driver (no report from the guest)"),
    ("facts", "attaching the recorder's probes"),
    ("recording", "running the scenario (probes attached, no counters yet)"),
    ("ran", "reading the module's counters after the scenario"),
    ("counters", "removing the recorder's probes after the scenario"),
    ("done", "powering off after the run"),
)


def guest_stage(results: dict[str, Any]) -> str:
    """What the guest was doing when it stopped, from its last report (read_results)."""
    stage = GUEST_STAGES[0][1]
    for kind, doing in GUEST_STAGES[1:]:
        if kind in results:
            stage = doing
    return stage


_ANSI_RE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|c)")  # SeaBIOS clears the screen


def last_console_line(console: str) -> str:
    """The console's last non-empty line, shortened (what the guest said last)."""
    for line in reversed(console.splitlines()):
        line = _ANSI_RE.sub("", line).strip()
        if line:
            return line if len(line) <= 160 else line[:157] + "..."
    return ""


def panic_progress(console: str) -> list[str]:
    """The module's per-update console lines (what got done before a panic)."""
    return re.findall(r"pks_test: update \d+ [^\n]*done", console)


def run(o: RunOptions, log: Callable[[str], None] = print) -> RunResult:
    """Boot, run, record, write the trace. Raises PkstraceError on set-up failures only."""
    from pkstrace import tracefile
    from pkstrace.emulate.initramfs import run_archive
    from pkstrace.emulate.module import build_module

    iso = check_options(o)
    if o.output.exists() and not o.force:
        raise tracefile.TraceFileError(f"{o.output} exists (use --force to overwrite)")
    t_start = time.monotonic()
    kern = _guest_kernel(o, log)
    ko = build_module(kern, log=log)
    work = _workdir(o.scenario)
    params = (f"scenario={o.scenario} iterations={o.iterations} threads={o.threads} "
              "updater_cpu=0")
    from pkstrace.backends.base import kernel_version

    events, kprobes = record_probes(o.csd_kprobes, kern.release)
    if not o.csd_kprobes and (0, 0) < kernel_version(kern.release) < (6, 3):
        # no csd tracepoints before 6.3: record the calls as `pkstrace record` would.
        # The csd / ipi tracepoints are still asked for, so the trace's probe table
        # shows the guest kernel's own answer (and build_trace drops any they give).
        o.csd_kprobes = "only"
        events, kprobes = record_probes("both", kern.release)
        log(f"emulate: {kern.release} has no csd tracepoints (before 6.3): cross-CPU calls "
            "recorded with kprobes and the call-function vectors (--csd-kprobes)")
    cfg = {
        "events": events, "kprobes": kprobes, "msr": RECORD_MSR,
        "buffer_kb": 2048, "clock": "mono", "ready_timeout_s": 120, "stop_timeout_s": 60,
        "settle_s": 0.3,
    }
    initrd = run_archive(work / "initrd.cpio", ko, params, cfg, log=log,
                         early_modules=virtio_console_modules(kern))
    timeout = o.timeout_s or (180 + 10 * o.cpus + 0.5 * o.iterations * o.cpus)
    append = qemu.kernel_cmdline(_cpulist(iso))
    log(f"emulate: booting {kern.release} with {o.cpus} vCPUs"
        f"{', isolated ' + _cpulist(iso) if iso else ''} (TCG), scenario {o.scenario}")
    boot, notes = boot_with_retries(
        lambda: qemu.boot(kern.vmlinuz, initrd, o.cpus, append, work, timeout, o.mem_mb,
                          give_up=stalled_while_attaching(work / "results.jsonl")),
        lambda: "counters" in read_results(work / "results.jsonl"), log)
    record = {
        "options": {"scenario": o.scenario, "cpus": o.cpus, "isolated": iso,
                    "iterations": o.iterations, "threads": o.threads,
                    "csd_kprobes": o.csd_kprobes},
        "kernel": kern.release, "append": append, "timeout_s": timeout, "clock": cfg["clock"],
        "boot": {"status": boot.status, "wall_s": round(boot.wall_s, 3), "panic": boot.panic,
                 "warnings": boot.warnings, "tcg_int3": boot.tcg_int3,
                 "returncode": boot.returncode, "command": boot.command},
        "notes": notes, "wall_s": round(time.monotonic() - t_start, 3),
    }
    (work / "run.json").write_text(json.dumps(record, indent=1))
    return build_trace(work, o.output, force=o.force, log=log)


def build_trace(work: Path, output: Path, force: bool = False,
                log: Callable[[str], None] = print) -> RunResult:
    """Turn a run directory (kept under the cache's runs/) into a .pkstrace.

    Separate from the boot so that a run is never lost: ``pkstrace emulate
    --rebuild DIR`` redoes this step from the files the guest left.
    """
    from pkstrace import tracefile

    try:
        record = json.loads((work / "run.json").read_text())
        opts = record["options"]
        sc = SCENARIOS[opts["scenario"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EmulateError(f"{work}: not a pkstrace emulate run directory ({e})") from None
    if output.exists() and not force:
        raise tracefile.TraceFileError(f"{output} exists (use --force to overwrite)")
    bootrec = record["boot"]
    results = read_results(work / "results.jsonl")
    console = work / "console.log"
    console_text = console.read_text(errors="replace") if console.exists() else ""
    notes = list(record.get("notes", []))
    status = bootrec["status"]
    if bootrec["tcg_int3"] and "counters" in results and status == "panic":
        # the run and its counters were complete; the crash hit the probes' removal
        own = [w for w in bootrec["warnings"] if not qemu.TCG_INT3_RE.search(w)]
        status = "bug" if own else "ok"
        notes.append("guest crashed after the run while the tracer removed its probes "
                     "(TCG stale int3); events and counters are complete")
    elif status in ("ok", "bug") and "done" not in results:
        status = "incomplete"
    if bootrec["panic"] and status not in ("ok", "bug"):
        notes.append(f"guest panicked: {bootrec['panic']}")
    notes += [f"guest console: {w}" for w in bootrec["warnings"][:5]]
    notes += [f"guest driver: {e}" for e in results["errors"]]
    if status == "timeout":
        notes.append(f"guest did not finish within {record['timeout_s']:.0f} s and was stopped")
    if status not in ("ok", "bug"):
        notes.append(f"guest stopped while {guest_stage(results)}; its last console line: "
                     f"{last_console_line(console_text) or '(none)'}")
    elif status == "stall":
        notes.append("guest stalled while the tracer attached or removed its probes "
                     "(every attempt) and was stopped")

    # Keep the console log beside the trace: a panic or a warning is a result.
    console_out = output.with_name(output.name + ".console.log")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(console, console_out)
    except OSError as e:
        raise EmulateError(f"cannot write {console_out}: {e.strerror}") from None

    events = work / "events.txt"
    events_text = events.read_text(errors="replace") if events.exists() else ""
    smeta = stream_meta(events_text)
    csd_mode = str(opts.get("csd_kprobes", ""))
    if csd_mode == "both":
        # One run, both recording paths: the tracepoint path's trace beside FILE, FILE
        # itself what a kernel before 6.3 gives (same events, same module counters).
        tp_output = tracepoints_twin(output)
        fallback_probes = {f"kprobe:{f}" for f in CSD_FALLBACK_EVENTS}
        all_probes = list(smeta["probes"])
        smeta["probes"] = [p for p in all_probes if p.get("name") not in fallback_probes]
        _write_emulated(tp_output, drop_events(events_text, CSD_FALLBACK_EVENTS), smeta,
                        "", record, opts, sc, bootrec, results, console_text,
                        [*notes, f"--csd-kprobes both: the same run recorded with kprobes "
                                  f"is {output.name}"], status, console_out, force, work)
        log(f"emulate: tracepoint-path trace of the same run: {tp_output}")
        events_text = drop_events(events_text, CSD_TRACEPOINT_EVENTS)
        smeta["probes"] = [p for p in all_probes
                           if not str(p.get("name", "")).startswith(("csd:", "ipi:"))]
        notes.append(f"--csd-kprobes both: the same run's csd/ipi tracepoints are in "
                     f"{tp_output.name}")
    elif csd_mode == "only":
        events_text = drop_events(events_text, CSD_TRACEPOINT_EVENTS)  # one path per trace
    ground_truth = _write_emulated(output, events_text, smeta, csd_mode, record, opts, sc,
                                   bootrec, results, console_text, notes, status, console_out,
                                   force, work)
    return RunResult(output=output, status=status, expected=sc.expect,
                     console_log=console_out, wall_s=float(record["wall_s"]),
                     ground_truth=ground_truth, notes=notes)


# Event names each recording path adds (what drop_events removes for "both").
CSD_TRACEPOINT_EVENTS = ("csd_queue_cpu", "csd_function_entry", "csd_function_exit",
                         "ipi_send_cpu", "ipi_send_cpumask")
CSD_FALLBACK_EVENTS = ("generic_exec_single", "smp_call_function_many_cond",
                       "smp_call_function_many")


def tracepoints_twin(output: Path) -> Path:
    """Where --csd-kprobes both writes the tracepoint path's trace: X.tracepoints.pkstrace."""
    return output.with_name(f"{output.stem}.tracepoints{output.suffix or '.pkstrace'}")


def drop_events(text: str, names: tuple[str, ...]) -> str:
    """The ftrace text without the lines of these events (one regex pass over the text)."""
    alt = "|".join(re.escape(n) for n in names)
    return re.sub(rf"^[^\n#][^\n]*? (?:\w+:)?(?:{alt}): [^\n]*(?:\n|$)", "", text, flags=re.M)


def sysfs_cpulist(text: str) -> list[int]:
    """A CPU list file of the guest's sysfs: without nohz_full= the kernel prints "(null)"."""
    from pkstrace.schema import parse_cpulist

    text = (text or "").strip()
    return [] if text == "(null)" else parse_cpulist(text)


def _write_emulated(output: Path, events_text: str, smeta: dict[str, Any], csd_mode: str,
                    record: dict[str, Any], opts: dict[str, Any], sc: Scenario,
                    bootrec: dict[str, Any], results: dict[str, Any], console_text: str,
                    notes: list[str], status: str, console_out: Path,
                    force: bool, work: Path) -> dict[str, Any]:
    """Parse the guest's event stream and write one emulated trace; its ground truth."""
    from pkstrace import schema, tracefile
    from pkstrace.importers.ftrace_text import parse_text

    df, stats = parse_text(events_text)
    facts = results.get("facts", {}).get("facts", {})
    counters = results.get("counters", {}).get("counters", {})
    ground_truth: dict[str, Any] = dict(counters)
    if not counters:
        ground_truth = {"complete": False,
                        "updates_logged": len(panic_progress(console_text))}
    else:
        ground_truth["complete"] = True
    iso = list(opts["isolated"])
    host = {
        "hostname": facts.get("hostname", "pkstrace-guest"),
        "kernel": facts.get("kernel", record["kernel"]),
        "cpu_model": facts.get("cpu_model", "QEMU TCG -cpu max"),
        "cpu_flags": facts.get("cpu_flags", []),
        "online_cpus": sysfs_cpulist(facts.get("online", "")) or list(range(opts["cpus"])),
        "isolated_cpus": sysfs_cpulist(facts.get("isolated", "")) if facts else iso,
        "nohz_full_cpus": sysfs_cpulist(facts.get("nohz_full", "")) if facts else iso,
        "pks": bool(counters.get("pks_cpuid", True)),
        "emulated": True,
        "cmdline": facts.get("cmdline", record["append"]),
    }
    lost = {int(k): int(v) for k, v in (smeta.get("lost") or {}).items()}
    for cpu, n in stats.lost_events.items():
        lost[cpu] = lost.get(cpu, 0) + n
    ts = df["ts"].to_numpy() if len(df) else []
    meta = schema.TraceMeta(
        host=host,
        clock=str(smeta.get("clock") or record["clock"]),
        backend="tracefs",
        mode="events",
        window={"start_ns": int(min(ts)), "end_ns": int(max(ts))} if len(ts) else {},
        lost_events=lost,
        probes=smeta["probes"],
        unmodeled_events=dict(stats.unmodeled_events),
        unparsed_lines=dict(stats.unparsed_lines),
        scenario={
            "name": sc.name, "design": sc.summary, "cpus": opts["cpus"],
            "isolated": iso, "iterations": opts["iterations"], "threads": opts["threads"],
            "kernel": record["kernel"], "status": status, "expected": sc.expect,
            "wall_s": record["wall_s"], "boot_wall_s": bootrec["wall_s"],
            "run_s": results.get("ran", {}).get("run_s"),
            "attach_s": results.get("recording", {}).get("attach_s"),
            "panic": bootrec["panic"], "warnings": bootrec["warnings"],
            "console_log": console_out.name, "run_dir": str(work), "qemu": bootrec["command"],
        },
        ground_truth=ground_truth,
        command=["pkstrace", "emulate", "--scenario", sc.name, "--cpus", str(opts["cpus"]),
                 "--isolated", _cpulist(iso), "--iterations", str(opts["iterations"]),
                 "--threads", str(opts["threads"])],
        source="emulated",
        partial=status not in ("ok", "bug"),
        notes=notes,
    )
    if csd_mode:
        meta.command += ["--csd-kprobes", csd_mode]
    tracefile.write_trace(output, schema.Trace(events=df, meta=meta), force=force)
    return ground_truth
