"""Lost events the kernel does not attribute to a CPU (bcc's recursion-guard misses)."""

from pkstrace import schema
from pkstrace.analysis import analyse
from pkstrace.importers import open_trace
from pkstrace.reports import terminal


def test_unknown_cpu_losses_are_named_not_printed_as_cpu_minus_one(fixtures):
    t = open_trace(fixtures / "ftrace_cpuid_2cpu.txt")
    t.meta.lost_events = {schema.LOST_CPU_UNKNOWN: 3, 1: 2}
    out = terminal.render(analyse(t))
    assert "CPU unknown (BPF recursion guard): 3" in out
    assert "CPU 1: 2" in out
    assert "CPU -1" not in out and "CPUs -1" not in out
