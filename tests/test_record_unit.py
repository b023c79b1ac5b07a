"""Recording building blocks that need no kernel access: probe plans, filters, symbols."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pkstrace import schema
from pkstrace.backends import hostfacts
from pkstrace.backends.base import (
    GLOBAL_UPDATE_ARGS,
    WRITE_PKRS_ARGS,
    RecordOptions,
    plan_probes,
)
from pkstrace.backends.symbols import KernelSymbols
from pkstrace.backends.tracefs import (
    DEFAULT_EVENTS,
    KprobeSpec,
    cpumask_hex,
    instance_owner_pid,
    msr_filter,
)


def test_default_events_are_the_schemas_tracepoints() -> None:
    from_schema = {f"{s}:{e}" for e, s in schema.TRACEPOINT_SYSTEMS.items() if e != "read_msr"}
    assert set(DEFAULT_EVENTS) == from_schema


def test_tracefs_raw_layer_imports_no_pandas() -> None:
    code = ("import sys; import pkstrace.backends.tracefs, pkstrace.backends.hostfacts; "
            "print(sorted(m for m in ('pandas', 'numpy', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("cpus", "mask"), [
    ([0], "00000001"), ([0, 1], "00000003"), ([6, 7], "000000c0"),
    ([0, 33], "00000002,00000001"), ([64], "00000001,00000000,00000000"),
])
def test_cpumask_hex(cpus: list[int], mask: str) -> None:
    assert cpumask_hex(cpus) == mask


def test_msr_filter() -> None:
    assert msr_filter(None) == "" and msr_filter([]) == ""
    assert msr_filter([0x6E1]) == "msr == 0x6e1"
    assert msr_filter([0x830, 0x6E0, 0x830]) == "msr == 0x6e0 || msr == 0x830"


@pytest.mark.parametrize(("name", "pid"), [
    ("pkstrace-123", 123), ("pkstrace-123-2", 123), ("pkstrace_77", 77), ("pkstrace_77_1", 77),
    ("pkstrace-fixture", None), ("other-123", None), ("pkstrace-12x", None), ("pks", None),
])
def test_instance_owner_pid_only_claims_our_names(name: str, pid: int | None) -> None:
    assert instance_owner_pid(name) == pid


def test_kprobe_spec_parse() -> None:
    k = KprobeSpec.parse("write_pkrs:write_pkrs new=%di:x32")
    assert (k.event, k.symbol, k.fetchargs) == ("write_pkrs", "write_pkrs", "new=%di:x32")
    with pytest.raises(ValueError):
        KprobeSpec.parse("no-colon new=%di")
    with pytest.raises(ValueError):
        KprobeSpec.parse("bad-name:sym")


def _by_name(specs: list) -> dict:  # noqa: ANN001 - tiny helper
    return {s.name: s for s in specs}


def test_plan_default_msr_filter_follows_pks() -> None:
    specs, _ = plan_probes(RecordOptions(), set(), False, have_pks=True)
    assert _by_name(specs)["msr:write_msr"].filter == "msr == 0x6e1"
    specs, _ = plan_probes(RecordOptions(), set(), False, have_pks=False)
    assert _by_name(specs)["msr:write_msr"].filter == ""
    specs, _ = plan_probes(RecordOptions(msrs=[0x830]), set(), False, have_pks=True)
    assert _by_name(specs)["msr:write_msr"].msrs == (0x830,)


def test_plan_marks_required_probes_and_options() -> None:
    specs, _ = plan_probes(RecordOptions(read_msr=True, sched_switch=False), set(), False, False)
    by = _by_name(specs)
    assert by["csd:csd_queue_cpu"].required and by["csd:csd_function_entry"].required
    assert by["msr:write_msr"].required and by["msr:read_msr"].required
    assert not by["ipi:ipi_send_cpu"].required
    assert "sched:sched_switch" not in by


def test_plan_kprobes_where_the_kernel_has_the_functions() -> None:
    syms = {"write_pkrs", "update_global_pkrs", "my_update"}
    specs, absent = plan_probes(RecordOptions(symbols=["my_update"]), syms,
                                kprobes_available=True, have_pks=True)
    kp = {s.symbol: s for s in specs if s.kind == "kprobe"}
    assert kp["write_pkrs"].event == "write_pkrs" and kp["write_pkrs"].fetchargs == WRITE_PKRS_ARGS
    assert kp["update_global_pkrs"].fetchargs == GLOBAL_UPDATE_ARGS
    assert kp["my_update"].required and not kp["write_pkrs"].required
    # A second global-update probe gets a tracefs-style name the importer maps.
    assert kp["my_update"].event == "p_update_global_pkrs_1"
    from pkstrace.importers.common import kind_of_event

    assert kind_of_event("p_update_global_pkrs_1")[0] == schema.Kind.GLOBAL_UPDATE
    assert {a.name for a in absent} == {"kprobe:pks_update_protection", "kprobe:pks_update_global"}
    assert all("no such function" in a.reason for a in absent)


def test_plan_without_kprobes_reports_present_functions_unprobed() -> None:
    specs, absent = plan_probes(RecordOptions(), {"write_pkrs"}, False, True)
    assert not [s for s in specs if s.kind == "kprobe"]
    reasons = {a.name: a.reason for a in absent}
    assert "CONFIG_KPROBES" in reasons["kprobe:write_pkrs"]
    assert "no such function" in reasons["kprobe:update_global_pkrs"]


def test_kernel_symbols_vectorised(tmp_path: Path) -> None:
    ks = tmp_path / "kallsyms"
    ks.write_text("ffffffff81000000 T _text\n"
                  "ffffffff81000100 t alpha\n"
                  "ffffffff81000180 T beta\n"
                  "ffffffff81000200 D some_data\n"
                  "ffffffff81000300 T gamma\n")
    syms = KernelSymbols(str(ks))
    addrs = np.array([0xFFFFFFFF81000100, 0xFFFFFFFF81000120, 0xFFFFFFFF81000180,
                      0, 0x10], dtype=np.uint64)
    assert list(syms.symbolize(addrs)) == ["alpha+0x0", "alpha+0x20", "beta+0x0", "", "0x10"]
    assert list(syms.symbolize(addrs, with_offset=False)) == ["alpha", "alpha", "beta", "", "0x10"]
    assert syms.table(addrs) == {0xFFFFFFFF81000100: "alpha+0x0",
                                 0xFFFFFFFF81000120: "alpha+0x20",
                                 0xFFFFFFFF81000180: "beta+0x0", 0x10: "0x10"}


def test_hostfacts_cpulist_agrees_with_schema() -> None:
    for text in ("", "0", "0-3", "0-3,6,8-9", "6-7"):
        assert hostfacts.parse_cpulist(text) == schema.parse_cpulist(text)


def test_hostfacts_collect_has_the_documented_keys() -> None:
    facts = hostfacts.collect()
    for key in ("hostname", "kernel", "cpu_model", "cpu_flags", "online_cpus",
                "isolated_cpus", "nohz_full_cpus", "cpuidle", "pks", "emulated"):
        assert key in facts
    assert facts["online_cpus"] and facts["pks"] == ("pks" in facts["cpu_flags"])


def test_prev_state_letters_and_cpumask() -> None:
    from pkstrace.backends.perf import cpumask_to_list, prev_state_letters

    assert list(prev_state_letters(np.array([0, 1, 2, 0x80, 0x100]))) == \
        ["R", "S", "D", "I", "R+"]
    mask = (0b11000101).to_bytes(8, "little")
    assert cpumask_to_list(mask) == "0,2,6-7"


def test_bcc_filter_conditions_collapse_ranges() -> None:
    from pkstrace.backends.bcc import EVENT_DTYPE, _cond

    assert _cond("c", []) == "1"
    assert _cond("c", [0, 1, 2, 5]) == "(((c) >= 0x0 && (c) <= 0x2) || (c) == 0x5)"
    # struct event_t in probes/pkstrace.bpf.c: 56 bytes (64 with the ring's record
    # header: one cache line), sched_switch's names at 24 and 40 in its union body.
    assert EVENT_DTYPE.itemsize == 56
    assert EVENT_DTYPE.fields["prev_comm"][1] == 24 and EVENT_DTYPE.fields["next_comm"][1] == 40
    assert "\n_Static_assert(sizeof(struct event_t) == 56" in (
        Path(__file__).resolve().parents[1] / "probes" / "pkstrace.bpf.c").read_text()


def test_btf_func_id_reads_vmlinux_btf() -> None:
    from pkstrace.backends.checks import BTF_VMLINUX, btf_func_id

    if not Path(BTF_VMLINUX).exists():
        pytest.skip("kernel has no BTF (/sys/kernel/btf/vmlinux)")
    assert btf_func_id("schedule") > 0
    assert btf_func_id("no_such_function_pkstrace") == 0


@pytest.mark.parametrize(("argv", "needle"), [
    (["--cpus", "3-1"], "--cpus"),
    (["--cpus", "999"], "not online"),
    (["--msr", "zz"], "--msr"),
    (["--mode", "counts", "--backend", "perf"], "needs --backend bcc"),
    (["-d", "-1"], "--duration"),
])
def test_record_bad_options_are_one_line_errors(argv: list[str], needle: str,
                                               tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "pkstrace", "record", "-o",
                        str(tmp_path / "t.pkstrace"), *argv], capture_output=True, text=True,
                       timeout=60)
    if p.returncode == 2 and "needs root" in p.stderr:
        pytest.skip("not root: the option is checked after the privilege check")
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("pkstrace record: error:") and needle in p.stderr
    assert p.stderr.strip().count("\n") == 0
    assert not (tmp_path / "t.pkstrace").exists()
