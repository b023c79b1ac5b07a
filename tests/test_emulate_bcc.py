"""The bcc backend's probes on write_pkrs / update_global_pkrs, on a kernel that has them.

This host has neither kprobes nor fentry, so those probes run inside the emulated
host (Debian 6.12 under QEMU, KPROBES=y, BTF, the pks_test module built with BTF):
`pkstrace emulate --backend bcc --func-probes both` boots once and runs the real
`pkstrace record --backend bcc` there twice, first with kprobes, then with fentry
programs, each over a fresh run of the v3 scenario. Every figure the analysis takes
from those events must equal the module's own counter (meta.ground_truth).

The fast tests below check the probe plan and the command-line errors without a guest.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pkstrace import tracefile
from pkstrace.backends.base import RecordOptions, plan_probes
from pkstrace.emulate import truth

ROOT = Path(__file__).resolve().parents[1]
PKSTRACE = [sys.executable, "-m", "pkstrace"]
PKS_FUNCS = {"write_pkrs", "update_global_pkrs"}


def func_probes(specs) -> dict[str, str]:  # noqa: ANN001
    return {s.symbol: s.kind for s in specs if s.kind != "tracepoint"}


# --- the probe plan: which mechanism for write_pkrs and the global update --------

@pytest.mark.parametrize("mode, kprobes, fentry, want", [
    ("auto", True, True, "kprobe"),     # kprobes win where both work
    ("auto", False, True, "fentry"),    # no kprobes (this host's kernel), fentry allowed
    ("fentry", True, True, "fentry"),   # forced
    ("kprobe", True, True, "kprobe"),
])
def test_plan_chooses_the_function_probe_mechanism(mode: str, kprobes: bool, fentry: bool,
                                                   want: str) -> None:
    specs, absent = plan_probes(RecordOptions(func_probes=mode), PKS_FUNCS, kprobes, True,
                                backend="bcc", csd_tracepoints=True, fentry_available=fentry)
    assert func_probes(specs) == {"write_pkrs": want, "update_global_pkrs": want}
    names = {s.name for s in specs}
    assert f"{want}:write_pkrs" in names and f"{want}:update_global_pkrs" in names
    assert all(r.reason.startswith("absent: the kernel has no such function") for r in absent)


@pytest.mark.parametrize("mode, kprobes, reason", [
    ("auto", False, "no kprobes (CONFIG_KPROBES off) and fentry is not allowed"),
    ("fentry", True, "fentry is not allowed here"),
    ("kprobe", False, "no kprobes"),
])
def test_plan_says_why_a_function_cannot_be_probed(mode: str, kprobes: bool,
                                                   reason: str) -> None:
    specs, absent = plan_probes(RecordOptions(func_probes=mode), PKS_FUNCS, kprobes, True,
                                backend="bcc", csd_tracepoints=True, fentry_available=False)
    assert func_probes(specs) == {}
    why = {r.name.split(":", 1)[1]: r.reason for r in absent if not r.attached}
    assert reason in why["write_pkrs"] and reason in why["update_global_pkrs"]


@pytest.mark.parametrize("args, message", [
    (["emulate", "--func-probes", "fentry", "-o", "x.pkstrace"], "needs --backend bcc"),
    (["emulate", "--backend", "bcc", "--csd-kprobes", "-o", "x.pkstrace"],
     "--csd-kprobes is for the tracefs recorder"),
])
def test_emulate_option_errors_are_one_line(args: list[str], message: str,
                                            tmp_path: Path) -> None:
    p = subprocess.run([*PKSTRACE, *args], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("pkstrace emulate: error: ") and message in lines[0]
    assert not (tmp_path / "x.pkstrace").exists()


# --- the real thing: bcc in the guest, kprobes then fentry, one boot ---------------

def _bcc_importable() -> bool:
    p = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, timeout=60)
    return p.returncode == 0


@pytest.mark.emulated
@pytest.mark.slow
def test_bcc_kprobe_and_fentry_in_the_guest_equal_the_module_counters(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64 (Debian package qemu-system-x86)")
    if not _bcc_importable():
        pytest.skip("needs bcc for this Python (Debian package python3-bpfcc): the guest "
                    "runs this host's bcc over 9p")
    out = tmp_path / "v3.pkstrace"
    p = subprocess.run([*PKSTRACE, "emulate", "--backend", "bcc", "--func-probes", "both",
                        "--cpus", "4", "--isolated", "3", "--scenario", "v3",
                        "--iterations", "5", "-q", "-o", str(out)],
                       capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "guest outcome ok (expected ok)" in p.stderr
    fentry_out = tmp_path / "v3.fentry.pkstrace"
    for path, method, how in ((out, "kprobe", "BPF kprobe"),
                              (fentry_out, "fentry", "BPF fentry (pks_test BTF)")):
        trace = tracefile.read_trace(path)
        meta, gt = trace.meta, trace.meta.ground_truth
        assert meta.backend == "bcc" and meta.source == "emulated"
        assert meta.scenario["status"] == "ok" and meta.scenario["func_probes"] == method
        # host facts are the guest's own, as bcc's recorder collected them there
        assert meta.host["kernel"].startswith("6.12.") and meta.host["emulated"]
        assert meta.host["isolated_cpus"] == [3]
        probes = {pr["name"]: pr for pr in meta.probes}
        for func in ("write_pkrs", "update_global_pkrs"):
            pr = probes[f"{method}:{func}"]
            assert pr["attached"] and pr["reason"] == how, pr
        assert gt["complete"] and gt["updates"] == 5
        kinds = trace.events["kind"].astype(str)
        assert int((kinds == "write_pkrs").sum()) == gt["write_pkrs_calls"] > 0
        assert int((kinds == "global_update").sum()) == gt["updates"]
        from pkstrace.analysis import analyse

        checks = truth.compare(analyse(trace), gt)
        bad = [c for c in checks if not c.equal]
        assert checks and not bad, f"{method}: differs from the module:\n" + truth.table(bad)
        assert not any(c.name == "updates with preempt drift" for c in checks)  # no flags


def test_rebuild_of_a_bcc_run_directory_overlays_the_guest_traces(tmp_path: Path) -> None:
    """`emulate --rebuild DIR` on a --backend bcc run: each guest trace gets the
    scenario, its own run's counters and the console log; no boot needed."""
    import json

    from pkstrace import schema
    from pkstrace.emulate import bcc_run

    work = tmp_path / "run"
    (work / bcc_run.OUT_DIR).mkdir(parents=True)
    for label in ("kprobe", "fentry"):
        meta = schema.TraceMeta(host={"kernel": "6.12.117+deb12-amd64", "pks": True},
                                backend="bcc", notes=[f"recorded with {label}"])
        tracefile.write_trace(work / bcc_run.OUT_DIR / bcc_run.trace_name(label),
                              schema.Trace(events=schema.empty_events(), meta=meta))
    (work / "console.log").write_text("pkstrace-guest: powering off\n")
    lines = [{"type": "facts", "facts": {"online": "0-3"}}]
    for i in (0, 1):
        lines += [{"type": "counters", "run": i, "counters": {"updates": 5 + i,
                                                             "pks_cpuid": True}},
                  {"type": "done", "run": i, "recorder_status": 0}]
    (work / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (work / "run.json").write_text(json.dumps({
        "backend": "bcc", "func_probes": "both", "runs": ["kprobe", "fentry"],
        "options": {"scenario": "v3", "cpus": 4, "isolated": [3], "iterations": 5,
                    "threads": 3},
        "kernel": "6.12.117+deb12-amd64", "append": "", "timeout_s": 100, "wall_s": 99.0,
        "boot": {"status": "ok", "wall_s": 98.0, "panic": "", "warnings": [],
                 "tcg_int3": False, "returncode": 0, "command": ["qemu"]},
        "notes": []}))
    out = tmp_path / "x.pkstrace"
    p = subprocess.run([*PKSTRACE, "emulate", "--rebuild", str(work), "-o", str(out), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for path, label, updates in ((out, "kprobe", 5), (tmp_path / "x.fentry.pkstrace",
                                                      "fentry", 6)):
        meta = tracefile.read_meta(path)
        assert meta.backend == "bcc" and meta.source == "emulated" and meta.host["emulated"]
        assert meta.scenario["func_probes"] == label and meta.scenario["status"] == "ok"
        assert meta.ground_truth["updates"] == updates and meta.ground_truth["complete"]
        assert f"recorded with {label}" in meta.notes
        assert (path.parent / (path.name + ".console.log")).exists()
    assert "fentry recording of the same boot" in p.stderr
