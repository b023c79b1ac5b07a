"""What this host allows: the checks behind `pkstrace doctor` and record's errors.

Each check says ok / missing / info, why, and the exact command that fixes a
missing item. The BPF checks really load a two-instruction program through the
bpf() syscall (no compiler needed): bcc's ``support_kfunc()`` answers from the
BTF file alone and says yes on kernels that then refuse every fentry program.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import importlib
import os
import platform
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from pkstrace.backends import hostfacts
from pkstrace.backends.tracefs import DEFAULT_EVENTS, find_tracefs, leftovers

OK, MISSING, INFO = "ok", "missing", "info"
MOUNT_TRACEFS = "mount -t tracefs nodev /sys/kernel/tracing"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"

# Fixes for tracepoints a kernel may lack (they arrived in these versions).
TRACEPOINT_FIX = {
    "csd": "needs Linux >= 6.3 (csd tracepoints); on older kernels use a kprobe-capable "
           "kernel (CONFIG_KPROBES=y)",
    "ipi": "needs Linux >= 6.3 (ipi_send_cpu / ipi_send_cpumask)",
    "msr": "needs CONFIG_TRACEPOINTS=y on x86 (msr tracepoints)",
    "irq_vectors": "needs CONFIG_X86_LOCAL_APIC and CONFIG_TRACEPOINTS",
    "sched": "needs CONFIG_TRACEPOINTS=y",
}


@dataclass
class Check:
    name: str
    status: str  # ok / missing / info
    detail: str = ""
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != MISSING

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


# ---------------------------------------------------------------------------
# bpf() syscall: load a trivial program of a given type
# ---------------------------------------------------------------------------
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24
# r0 = 0; exit
_RET0 = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def bpf_prog_load(prog_type: int, expected_attach_type: int = 0, attach_btf_id: int = 0) -> int:
    """Load `r0 = 0; exit` as ``prog_type``; returns 0 or the errno (fd closed at once)."""
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(_RET0, len(_RET0))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQ", attr, 0, prog_type, 2, ctypes.addressof(insns),
                     ctypes.addressof(lic))
    struct.pack_into("<I", attr, 68, expected_attach_type)
    struct.pack_into("<I", attr, 108, attach_btf_id)
    fd = libc.syscall(SYS_BPF, BPF_PROG_LOAD, attr, 128)
    if fd < 0:
        return ctypes.get_errno() or errno.EINVAL
    os.close(fd)
    return 0


# BTF kinds -> bytes that follow a btf_type (per vlen where marked).
_BTF_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8),
              14: (4, 0), 15: (0, 12), 17: (4, 0), 19: (0, 12)}
BTF_PTR, BTF_STRUCT, BTF_TYPEDEF, BTF_FUNC, BTF_FUNC_PROTO = 2, 4, 8, 12, 13


class BtfType(NamedTuple):
    pos: int  # byte offset of its btf_type in the blob (members/params follow it)
    name_off: int
    kind: int
    vlen: int
    kflag: int
    size_type: int  # size or referenced type id, by kind


def read_btf(path: str = BTF_VMLINUX) -> bytes | None:
    """A raw BTF blob (vmlinux or a module's split BTF), None if unreadable or not BTF."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if btf_sections(data) else None


def btf_sections(data: bytes) -> tuple[bytes, int, int] | None:
    """(string section, start and end of the type section) of a BTF blob, None if not BTF."""
    if len(data) < 24:
        return None
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        "<HBBIIIII", data, 0)
    if magic != 0xEB9F:
        return None
    return (data[hdr_len + str_off: hdr_len + str_off + str_len],
            hdr_len + type_off, hdr_len + type_off + type_len)


def btf_types(data: bytes) -> Iterator[BtfType]:
    """Every type of a BTF blob in id order (the first is id 1, or base count + 1 in split
    BTF)."""
    sections = btf_sections(data)
    if sections is None:
        return
    _, p, end = sections
    unpack = struct.unpack_from
    while p < end:
        name_off, info, size_type = unpack("<III", data, p)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        yield BtfType(p, name_off, kind, vlen, info >> 31, size_type)
        fixed, per = _BTF_EXTRA.get(kind, (0, 0))
        p += 12 + fixed + per * vlen


def btf_name_offset(strs: bytes, name: str) -> int:
    """Offset of ``name`` in a BTF string section, -1 if absent."""
    pos = strs.find(b"\0" + name.encode() + b"\0")
    return pos + 1 if pos >= 0 else -1


def btf_func_id(name: str, path: str = BTF_VMLINUX) -> int:
    """BTF type id of the FUNC ``name`` in vmlinux BTF (0 if absent)."""
    data = read_btf(path)
    if data is None:
        return 0
    want = btf_name_offset(btf_sections(data)[0], name)
    if want < 0:
        return 0
    for tid, t in enumerate(btf_types(data), 1):
        if t.kind == BTF_FUNC and t.name_off == want:
            return tid
    return 0


@dataclass(frozen=True)
class BtfFacts:
    """What the raw sched_switch program needs from vmlinux BTF."""

    member_offsets: dict[str, int]  # task_struct member -> byte offset (pid, comm, exit_state)
    tracepoint_args: dict[str, int]  # tracepoint -> number of TP_PROTO arguments


@functools.lru_cache(maxsize=4)
def btf_facts(members: tuple[str, ...] = ("pid", "comm", "exit_state"),
              tracepoints: tuple[str, ...] = ("sched_switch",),
              path: str = BTF_VMLINUX) -> BtfFacts | None:
    """Byte offsets of ``task_struct`` members and the argument count of each raw
    tracepoint (its ``btf_trace_<name>`` typedef: a pointer to a function whose
    first parameter is the BPF context) in vmlinux BTF; None without BTF.
    A member or tracepoint that is absent is left out."""
    data = read_btf(path)
    if data is None:
        return None
    strs = btf_sections(data)[0]

    def name_at(off: int) -> bytes:
        return strs[off:strs.index(b"\0", off)]

    want_struct = btf_name_offset(strs, "task_struct")
    want_typedefs = {btf_name_offset(strs, f"btf_trace_{t}"): t for t in tracepoints}
    want_typedefs.pop(-1, None)
    types = [BtfType(0, 0, 0, 0, 0, 0), *btf_types(data)]  # index = type id (0 is void)
    offsets: dict[str, int] = {}
    typedefs: dict[str, int] = {}  # tracepoint -> the typedef's target type id
    for t in types:
        if t.kind == BTF_STRUCT and t.name_off == want_struct and t.vlen and not offsets:
            for k in range(t.vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", data, t.pos + 12 + 12 * k)
                label = name_at(m_name).decode(errors="replace")
                if label in members:
                    offsets[label] = (m_off & 0xFFFFFF if t.kflag else m_off) // 8
        elif t.kind == BTF_TYPEDEF and t.name_off in want_typedefs:
            typedefs[want_typedefs[t.name_off]] = t.size_type
    nargs: dict[str, int] = {}
    for tp, tid in typedefs.items():
        ptr = types[tid] if 0 < tid < len(types) else None
        if ptr is None or ptr.kind != BTF_PTR or not 0 < ptr.size_type < len(types):
            continue
        proto = types[ptr.size_type]
        if proto.kind == BTF_FUNC_PROTO:
            nargs[tp] = proto.vlen - 1  # less the context pointer
    return BtfFacts(offsets, nargs)


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------

def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("root", OK, "running as root")
    return Check("root", MISSING, "attaching to the kernel needs root (CAP_BPF, CAP_PERFMON, "
                 "CAP_SYS_ADMIN)", "sudo pkstrace record ...")


def check_tracefs(mount: bool = False) -> Check:
    d = find_tracefs()
    if not d and mount and os.geteuid() == 0:
        os.system(MOUNT_TRACEFS + " >/dev/null 2>&1")
        d = find_tracefs()
        if d:
            return Check("tracefs", OK, f"mounted it at {d}")
    if d:
        return Check("tracefs", OK, f"mounted at {d}")
    return Check("tracefs", MISSING, "tracefs is not mounted", MOUNT_TRACEFS)


def check_tracepoints(events: tuple[str, ...] = DEFAULT_EVENTS) -> list[Check]:
    d = find_tracefs()
    out = []
    for ev in (*events, "msr:read_msr"):
        sysname, _, name = ev.partition(":")
        if not d:
            out.append(Check(f"tracepoint {ev}", INFO, "unknown (tracefs not mounted)",
                             MOUNT_TRACEFS))
        elif os.path.isdir(f"{d}/events/{sysname}/{name}"):
            out.append(Check(f"tracepoint {ev}", OK, "present"))
        else:
            out.append(Check(f"tracepoint {ev}", MISSING, "not in this kernel",
                             TRACEPOINT_FIX.get(sysname, "")))
    return out


def kprobes_available() -> bool:
    d = find_tracefs()
    return bool(d and os.path.exists(f"{d}/kprobe_events"))


def check_kprobes() -> Check:
    if kprobes_available():
        return Check("kprobes", OK, "kprobe_events present")
    if not find_tracefs():
        return Check("kprobes", INFO, "unknown (tracefs not mounted)", MOUNT_TRACEFS)
    return Check("kprobes", MISSING, "kernel built without CONFIG_KPROBES: write_pkrs and the "
                 "global update cannot be probed here",
                 "boot a kernel with CONFIG_KPROBES=y, or use `pkstrace emulate`")


def check_bpf() -> Check:
    if os.geteuid() != 0:
        return Check("BPF", INFO, "not checked (needs root)", "sudo pkstrace doctor")
    err = bpf_prog_load(BPF_PROG_TYPE_TRACEPOINT)
    if err == 0:
        return Check("BPF", OK, "loaded a tracepoint BPF program")
    return Check("BPF", MISSING, f"bpf(BPF_PROG_LOAD) failed: {os.strerror(err)}",
                 "boot a kernel with CONFIG_BPF_SYSCALL=y (and no lockdown=confidentiality); "
                 "--backend perf or tracefs work without BPF")


def check_btf() -> Check:
    if os.path.exists(BTF_VMLINUX):
        return Check("BTF", OK, BTF_VMLINUX)
    return Check("BTF", MISSING, "no kernel BTF (CONFIG_DEBUG_INFO_BTF off)",
                 "boot a kernel with CONFIG_DEBUG_INFO_BTF=y (fentry needs it)")


_FENTRY_CACHE: dict[str, tuple[bool, str]] = {}


def fentry_allowed() -> tuple[bool, str]:
    """Really load an fentry program (on a function every kernel has)."""
    if "r" in _FENTRY_CACHE:
        return _FENTRY_CACHE["r"]
    if os.geteuid() != 0:
        res = (False, "not checked (needs root)")
    elif not os.path.exists(BTF_VMLINUX):
        res = (False, "no kernel BTF")
    else:
        tid = btf_func_id("do_nanosleep") or btf_func_id("schedule")
        if not tid:
            res = (False, "no FUNC in vmlinux BTF to attach to")
        else:
            err = bpf_prog_load(BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY, tid)
            res = (True, "loaded an fentry program") if err == 0 else (
                False, f"loading an fentry program fails: {errno.errorcode.get(err, err)} "
                       f"(bcc's support_kfunc() may still say True)")
    _FENTRY_CACHE["r"] = res
    return res


def check_fentry() -> Check:
    ok, why = fentry_allowed()
    if ok:
        return Check("fentry", OK, why)
    return Check("fentry", MISSING if "fails" in why else INFO, why,
                 "kernel policy (lockdown / BPF LSM) forbids BPF tracing programs; "
                 "tracepoints still work")


def headers_dir() -> str:
    return f"/lib/modules/{platform.release()}/build"


def check_headers() -> Check:
    d = headers_dir()
    if os.path.isdir(d) and (os.path.exists(f"{d}/Makefile") or os.path.isdir(f"{d}/include")):
        return Check("kernel headers (bcc)", OK, f"{d} -> {os.path.realpath(d)}")
    hdrs = sorted(glob.glob("/usr/src/linux-headers-*-amd64"))
    if hdrs:
        h = hdrs[-1]
        common = h[: -len("-amd64")] + "-common"
        kdir = os.path.dirname(d)
        return Check("kernel headers (bcc)", MISSING, f"{d} missing; {h} is installed",
                     f"mkdir -p {kdir} && ln -sfn {h} {d} && ln -sfn {common} {kdir}/source")
    return Check("kernel headers (bcc)", MISSING, f"{d} missing",
                 "apt-get install linux-headers-amd64 && make setup")


def _importable(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means unusable
        return False, f"import {module} failed: {e}"
    return True, f"import {module} works"


def bcc_importable() -> tuple[bool, str]:
    return _importable("bcc")


def check_bcc() -> Check:
    ok, why = bcc_importable()
    if ok:
        return Check("bcc (python3-bpfcc)", OK, why)
    return Check("bcc (python3-bpfcc)", MISSING, why,
                 "apt-get install python3-bpfcc && make setup  "
                 "(the venv must use --system-site-packages)")


def perf_importable() -> tuple[bool, str]:
    return _importable("perf")


def check_perf() -> Check:
    ok, why = perf_importable()
    if ok:
        return Check("perf Python bindings", OK, why)
    return Check("perf Python bindings", MISSING, why,
                 "apt-get install linux-perf && make setup")


@functools.cache
def perf_samples_idle_cpus(calls: int = 50) -> tuple[bool | None, str]:
    """Does perf sample a tracepoint hit in an interrupt on an idle CPU?

    Measured once per process (doctor's table and `auto` then agree; on a busy
    host the CPU may not idle and the answer can differ from run to run).

    Really measured: the perf backend records ``csd:csd_function_entry`` on one
    other (idle) CPU while this process makes ``calls`` synchronous cross-CPU
    calls to it, then compares the kernel's count with the samples read. Some
    kernels count such hits but never write them to the ring (Linux 6.18 in a
    Firecracker guest drops nearly all of them; `perf record -a` too). None: could
    not be measured here (not root, no perf binding, one CPU, no /dev/cpu/N/cpuid).
    """
    from pkstrace import workload
    from pkstrace.backends.base import ProbeSpec

    if os.geteuid() != 0:
        return None, "needs root"
    if not perf_importable()[0]:
        return None, "no perf Python bindings"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, "needs two CPUs"
    source, target = cpus[0], cpus[-1]
    if not workload.available(target):
        return None, f"no {workload.cpuid_device(target)} (CONFIG_X86_CPUID)"
    d = find_tracefs()
    if not d or not os.path.isdir(f"{d}/events/csd/csd_function_entry"):
        return None, "no csd:csd_function_entry tracepoint (or tracefs not mounted)"
    from pkstrace.backends.perf import PerfBackend

    backend = PerfBackend([ProbeSpec("csd:csd_function_entry", "tracepoint", True)],
                          cpus=[target])
    try:
        backend.attach()
        workload.cross_cpu_calls(calls, target_cpu=target, source_cpu=source, gap_s=0.001)
        backend.stop()
        got = backend.drain()
        backend.lost_events()
        missing = backend.unsampled_hits().get(target, 0)
    except Exception as e:  # noqa: BLE001 - any failure means: not measured
        return None, f"could not measure: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    finally:
        backend.detach()
    seen = int((got["cpu"] == target).sum()) if len(got) else 0
    if missing > calls // 10:
        return False, (f"{missing} of {missing + seen} csd entries on idle CPU {target} counted "
                       f"but never sampled: the perf backend loses what idle CPUs do")
    return True, f"{seen} csd entries on idle CPU {target} sampled, {missing} missing"


def check_perf_idle_sampling() -> Check:
    ok, why = perf_samples_idle_cpus()
    if ok is None:
        return Check("perf samples idle CPUs", INFO, f"not measured: {why}")
    if ok:
        return Check("perf samples idle CPUs", OK, why)
    return Check("perf samples idle CPUs", MISSING, why,
                 "use --backend bcc or tracefs (auto does)")


def check_bpftool() -> Check:
    p = shutil.which("bpftool") or (
        "/usr/sbin/bpftool" if os.path.exists("/usr/sbin/bpftool") else None)
    if p:
        return Check("bpftool", OK, p)
    return Check("bpftool", MISSING, "not installed (used to list leftover BPF programs)",
                 "apt-get install bpftool")


def check_kernel_functions(names: tuple[str, ...]) -> list[Check]:
    from pkstrace.backends.symbols import function_names

    syms = function_names()
    out = []
    for n in names:
        if syms is None:
            out.append(Check(f"function {n}", INFO, "unknown (/proc/kallsyms unreadable)"))
        elif n in syms:
            out.append(Check(f"function {n}", OK, "in /proc/kallsyms"))
        else:
            out.append(Check(f"function {n}", INFO,
                             "absent: not a PKS kernel (probe reported as absent)",
                             "use a kernel with the PKS series, or `pkstrace emulate`"))
    return out


def check_pks() -> Check:
    if hostfacts.cpu_has_pks():
        return Check("PKS in the CPU", OK, "cpu flag pks")
    return Check("PKS in the CPU", INFO, "no 'pks' flag: no PKRS writes to see "
                 "(default MSR filter: every MSR)",
                 "use a PKS CPU (Sapphire Rapids+) or `pkstrace emulate` (QEMU -cpu max)")


def check_isolated() -> Check:
    iso = hostfacts.isolated_cpus()
    nohz = hostfacts.nohz_full_cpus()
    if iso or nohz:
        return Check("isolated CPUs", OK,
                     f"isolated {iso or '-'}, nohz_full {nohz or '-'}")
    return Check("isolated CPUs", INFO, "none (isolation findings need some)",
                 "boot with isolcpus=N nohz_full=N, pass --isolated LIST, or `pkstrace emulate`")


def bpf_on_tracepoints(names: set[str], exclude_pid: int = -1) -> dict[str, list[int]]:
    """Tracepoints (bare event names) with BPF programs attached through perf, by
    whom (pids), from `bpftool perf list`. Such a program that returns 0 hides the
    tracepoint from every perf event (the perf backend, `perf record`), not from
    tracefs."""
    tool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if not os.path.exists(tool):
        return {}
    import json
    import subprocess

    try:
        p = subprocess.run([tool, "-j", "perf", "list"], capture_output=True, text=True,
                           timeout=10)
        rows = json.loads(p.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}
    if not isinstance(rows, list):  # {"error": ...}: not root, or bpftool cannot list
        return {}
    out: dict[str, list[int]] = {}
    for r in rows:
        if not isinstance(r, dict):
            continue
        tp = str(r.get("tracepoint", ""))
        pid = int(r.get("pid", -1))
        if r.get("fd_type") == "tracepoint" and tp in names and pid != exclude_pid:
            out.setdefault(tp, [])
            if pid not in out[tp]:
                out[tp].append(pid)
    return out


def check_foreign_bpf() -> Check:
    names = {e.partition(":")[2] for e in DEFAULT_EVENTS}
    found = bpf_on_tracepoints(names)
    if not found:
        return Check("BPF programs on our tracepoints", OK, "none")
    desc = ", ".join(f"{tp} (pid {','.join(map(str, p))})" for tp, p in sorted(found.items()))
    return Check("BPF programs on our tracepoints", INFO,
                 f"{desc}: the perf backend misses what these filter out",
                 "use --backend tracefs or bcc while they run")


def check_leftovers() -> Check:
    dead = [f"{k} {n}" for k, n, _pid, alive in leftovers() if not alive]
    if not dead:
        return Check("leftovers of dead recorders", OK, "none")
    return Check("leftovers of dead recorders", MISSING, ", ".join(dead[:4]),
                 "pkstrace doctor --cleanup")


def all_checks() -> list[Check]:
    from pkstrace import schema

    checks = [check_root(), check_tracefs(), check_bpf(), check_btf(), check_kprobes(),
              check_fentry(), check_headers(), check_bcc(), check_perf(),
              check_perf_idle_sampling(), check_bpftool()]
    checks += check_tracepoints()
    checks.append(check_cross_cpu_calls())
    checks += check_kernel_functions((*schema.WRITE_PKRS_FUNCS, *schema.GLOBAL_UPDATE_FUNCS))
    checks += [check_pks(), check_isolated(), check_foreign_bpf(), check_leftovers()]
    return checks


# ---------------------------------------------------------------------------
# Which backend can run here
# ---------------------------------------------------------------------------

def _first_missing(checks: list[Check]) -> Check | None:
    for c in checks:
        if c.status == MISSING:
            return c
    return None


def explain(c: Check) -> str:
    return f"{c.name}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "")


def check_cross_cpu_calls(backend: str = "tracefs") -> Check:
    """How ``backend`` records cross-CPU calls here: csd tracepoints (Linux >= 6.3), or
    the kprobe fallback (generic_exec_single / smp_call_function_many_cond and the
    call-function vectors), which only the tracefs backend attaches."""
    d = find_tracefs()
    name = "cross-CPU calls"
    if not d:
        return Check(name, INFO, "unknown (tracefs not mounted)", MOUNT_TRACEFS)
    if os.path.isdir(f"{d}/events/csd/csd_queue_cpu"):
        return Check(name, OK, "csd tracepoints (matched by csd token)")
    if not kprobes_available():
        return Check(name, MISSING, "no csd tracepoints (Linux < 6.3) and no kprobes for "
                     "the fallback", "boot Linux >= 6.3, or a kernel with CONFIG_KPROBES=y")
    if backend != "tracefs":
        return Check(name, MISSING, "no csd tracepoints (Linux < 6.3): the kprobe fallback "
                     f"is not available to the {backend} backend", "--backend tracefs")
    return Check(name, OK, "no csd tracepoints (Linux < 6.3): kprobes on generic_exec_single "
                 "/ smp_call_function_many_cond, matched to call-function vectors by time")


def backend_problem(name: str) -> str:
    """'' if backend ``name`` can run here, else one line saying why not and the fix."""
    base = [check_root(), check_tracefs(mount=True)]
    tps = [*check_tracepoints(("msr:write_msr",))[:1], check_cross_cpu_calls(name)]
    if name == "tracefs":
        c = _first_missing(base + tps)
        return explain(c) if c else ""
    if name == "perf":
        c = _first_missing([base[0], check_perf(), base[1], *tps])
        return explain(c) if c else ""
    if name == "bcc":
        c = _first_missing([base[0], check_bcc(), check_headers(), check_bpf(), base[1], *tps])
        return explain(c) if c else ""
    return f"unknown backend {name!r}"
