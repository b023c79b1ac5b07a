"""`pkstrace doctor` against this host's real kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pkstrace.backends import checks
from pkstrace.backends.tracefs import find_tracefs

pytestmark = [pytest.mark.live]
PKSTRACE = [sys.executable, "-m", "pkstrace"]


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PKSTRACE, "doctor", *args], capture_output=True, text=True,
                          timeout=120)


def test_doctor_json_matches_what_the_kernel_allows() -> None:
    p = doctor("--json")
    doc = json.loads(p.stdout)
    by = {c["name"]: c for c in doc["checks"]}
    for name in ("root", "tracefs", "BPF", "BTF", "kprobes", "fentry", "kernel headers (bcc)",
                 "bcc (python3-bpfcc)", "perf Python bindings", "bpftool",
                 "tracepoint csd:csd_queue_cpu", "tracepoint msr:write_msr",
                 "function write_pkrs", "PKS in the CPU", "isolated CPUs", "cross-CPU calls",
                 "perf samples idle CPUs"):
        assert name in by, name
    for c in doc["checks"]:
        if c["status"] == "missing":
            assert c["fix"], c  # every missing item says how to fix it
    assert by["root"]["status"] == ("ok" if os.geteuid() == 0 else "missing")
    root = find_tracefs()
    if root:
        has_kprobes = os.path.exists(f"{root}/kprobe_events")
        assert (by["kprobes"]["status"] == "ok") == has_kprobes
        # csd tracepoints (Linux >= 6.3), else the kprobe fallback where kprobes exist
        has_csd = os.path.isdir(f"{root}/events/csd/csd_queue_cpu")
        assert (by["cross-CPU calls"]["status"] == "ok") == (has_csd or has_kprobes)
        assert ("csd token" in by["cross-CPU calls"]["detail"]) == has_csd
    assert p.returncode == (0 if doc["auto_backend"] else 1)


def test_doctor_fentry_is_what_loading_says_not_what_bcc_claims() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to load a BPF program")
    from pkstrace.backends.checks import (
        BPF_PROG_TYPE_TRACING,
        BPF_TRACE_FENTRY,
        bpf_prog_load,
        btf_func_id,
    )

    tid = btf_func_id("do_nanosleep") or btf_func_id("schedule")
    if not tid:
        pytest.skip("kernel has no BTF to attach an fentry program to")
    loads = bpf_prog_load(BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY, tid) == 0
    fentry = {c["name"]: c for c in json.loads(doctor("--json").stdout)["checks"]}["fentry"]
    assert (fentry["status"] == "ok") == loads
    ok, _ = checks.bcc_importable()
    if ok and not loads:
        from bcc import BPF

        if BPF.support_kfunc():
            # bcc answers from the BTF file and says yes (this host): doctor must not.
            assert fentry["status"] == "missing" and "support_kfunc" in fentry["detail"]


def test_doctor_table_prints_fixes_and_the_auto_choice() -> None:
    p = doctor()
    assert p.returncode in (0, 1)
    lines = p.stdout.splitlines()
    assert lines[0].split()[:2] == ["check", "status"]
    missing = [i for i, ln in enumerate(lines) if "  MISSING  " in ln]
    for i in missing:
        assert lines[i + 1].strip().startswith("fix:"), lines[i:i + 2]
    assert lines[-1].startswith("record --backend auto:") or lines[-1].startswith("record:")


def test_doctor_cleanup_removes_only_dead_recorders_leftovers() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create tracefs instances")
    root = find_tracefs()
    if not root:
        pytest.skip("tracefs is not mounted")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    names = {
        "dead": f"pkstrace-{dead.pid}",
        "dead2": f"pkstrace-{dead.pid}-1",
        "live": f"pkstrace-{os.getpid()}-99",
        "foreign": "pkstrace-fixture-doctor-test",
    }
    for n in names.values():
        os.makedirs(f"{root}/instances/{n}", exist_ok=True)
    try:
        table = doctor().stdout
        assert f"instance {names['dead']}" in table
        p = doctor("--cleanup")
        assert p.returncode == 0, p.stderr
        assert f"removed instance {names['dead']}" in p.stdout
        assert f"kept instance {names['live']}" in p.stdout
        left = set(os.listdir(f"{root}/instances"))
        assert names["dead"] not in left and names["dead2"] not in left
        assert names["live"] in left and names["foreign"] in left
    finally:
        for n in names.values():
            try:
                os.rmdir(f"{root}/instances/{n}")
            except FileNotFoundError:
                pass


def test_record_explains_an_unusable_backend_in_one_line(tmp_path: os.PathLike[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (the privilege check comes first)")
    usable = [b for b in ("bcc", "perf", "tracefs") if not checks.backend_problem(b)]
    unusable = [b for b in ("bcc", "perf", "tracefs") if b not in usable]
    env = dict(os.environ)
    if unusable:
        b = unusable[0]
    else:
        # Every backend works here: make bcc unusable the way a host without
        # python3-bpfcc is, with a `bcc` module that fails to import ahead of Debian's.
        b = "bcc"
        shadow = os.path.join(tmp_path, "no-bcc")
        os.makedirs(os.path.join(shadow, "bcc"))
        with open(os.path.join(shadow, "bcc", "__init__.py"), "w") as f:
            f.write("raise ImportError('No module named bcc (python3-bpfcc not installed)')\n")
        env["PYTHONPATH"] = shadow + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([*PKSTRACE, "record", "--backend", b, "-o", f"{tmp_path}/x.pkstrace",
                        "-d", "1"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    assert p.stderr.startswith(f"pkstrace record: error: backend {b} cannot run here:")
    assert "fix:" in p.stderr and p.stderr.strip().count("\n") == 0


def test_perf_idle_sampling_is_measured_and_auto_follows_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The idle-CPU check really records cross-CPU calls with the perf backend; where it
    finds perf blind, `auto` (with bcc ruled out) takes tracefs instead of perf."""
    if os.geteuid() != 0 or not os.path.exists("/dev/cpu/1/cpuid"):
        pytest.skip("needs root and /dev/cpu/1/cpuid (CONFIG_X86_CPUID, a second CPU)")
    if checks.backend_problem("perf") or checks.backend_problem("tracefs"):
        pytest.skip("needs the perf and tracefs backends: "
                    f"{checks.backend_problem('perf') or checks.backend_problem('tracefs')}")
    ok, why = checks.perf_samples_idle_cpus()
    assert ok is not None, why
    assert "csd entries on idle CPU" in why
    from pkstrace.backends import select

    real = select.backend_problem
    monkeypatch.setattr(select, "backend_problem",
                        lambda name: "ruled out for this test" if name == "bcc" else real(name))
    name, reason = select.choose("auto", "events")
    if select.pks_functions_present():
        assert name == "tracefs", reason
    else:
        assert name == ("perf" if ok else "tracefs"), (ok, why, reason)
        assert ok or "perf samples idle CPUs" in reason, reason
