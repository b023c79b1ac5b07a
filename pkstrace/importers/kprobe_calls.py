"""Cross-CPU calls from kprobes, for kernels without the csd tracepoints (before 6.3).

``pkstrace record`` (tracefs backend) plans these where csd:csd_queue_cpu is missing
or ``--csd-kprobes`` asks for them (backends/base.py, plan_csd_fallback)::

    generic_exec_single: (generic_exec_single+0x4/0x120) cpu=1 func=cpuid_smp_cpuid+0x0/0x20 \
        csd=0xffffc90000383d80 caller=smp_call_function_single+0x8f/0x1a0
    smp_call_function_many_cond: (smp_call_function_many_cond+0x4/0x560) \
        mask=0xfe func=pks_apply_handler+0x0/0x60 [pks_test] caller=on_each_cpu_cond_mask+...

Rows, with the tracepoint path's spellings (func as a bare symbol, ``sym [mod]``
for a module; callsite ``sym+0xoff``):

* ``generic_exec_single`` to another CPU -> ``csd_queue`` (target_cpu, func, csd =
  the csd's address as the token, callsite = the caller). To the caller's own CPU
  the kernel runs the function right there, as csd_function_entry with a NULL csd
  shows on the tracepoint path -> ``csd_entry`` with csd 0 (a local call).
* ``smp_call_function_many_cond`` / ``smp_call_function_many`` -> ``ipi_send`` with
  ``cpumask`` (the CPU list of the mask's first 64 bits, as ipi_send_cpumask rows
  carry it) and func. The mask is what the caller asked for: the kernel leaves
  out the caller's CPU, and CPUs a cond_func() declines.

Event names: the function itself (what plan_csd_fallback names them), perf's /
tracefs's default ``p_<func>`` and ``p_<func>_<n>``, or ``<func>__entry``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pkstrace import schema

QUEUE_FUNCS = ("generic_exec_single",)
MANY_FUNCS = ("smp_call_function_many_cond", "smp_call_function_many")
KINDS: dict[str, schema.Kind] = {
    **{f: schema.Kind.CSD_QUEUE for f in QUEUE_FUNCS},
    **{f: schema.Kind.IPI_SEND for f in MANY_FUNCS},
}
# A symbol value as a kprobe's ":symbol" type prints it, with an optional module.
_SYM = r"[^\s]+(?: \[[^\]\s]+\])?"
_ARG = {
    "cpu": r"(?:^|\s)cpu=(?P<x>-?\d+)",
    "func": rf"(?:^|\s)func=(?P<x>{_SYM})",
    "csd": r"(?:^|\s)csd=(?P<x>0x[0-9a-fA-F]+|\d+)",
    "caller": rf"(?:^|\s)caller=(?P<x>{_SYM})",
    "mask": r"(?:^|\s)mask=(?P<x>0x[0-9a-fA-F]+|\d+)",
}


def canonical(name: str) -> str | None:
    """The probed function an event name stands for, if it is one of ours."""
    func = name
    if func.endswith("__entry"):
        func = func[: -len("__entry")]
    if func.startswith("p_"):
        func = func[2:]
        head, _, tail = func.rpartition("_")
        if head and tail.isdigit() and head in KINDS:
            func = head
    return func if func in KINDS else None


def _field(args: pa.Array, key: str) -> tuple[pa.Array, np.ndarray]:
    m = pc.extract_regex(args, _ARG[key])
    return pc.fill_null(m.field("x"), ""), np.asarray(m.is_valid())


def _mask_lists(arr: pa.Array) -> pa.Array:
    """'0xfe' -> '1-7' (distinct masks only: a handful per trace)."""
    d = pc.dictionary_encode(arr)
    if isinstance(d, pa.ChunkedArray):
        d = d.combine_chunks()
    lists = [schema.format_cpulist([i for i in range(64) if int(v, 0) >> i & 1])
             for v in d.dictionary.to_pylist()]
    return pa.DictionaryArray.from_arrays(d.indices, pa.array(lists, pa.string()))


def store(func: str, args: pa.Array, cpu: np.ndarray, rows: np.ndarray,
          cols: dict[str, np.ndarray], str_cols: dict[str, Any], kind_codes: np.ndarray,
          stats: Any) -> np.ndarray:
    """Parse one fallback kprobe's argument strings for ``rows`` (whose own CPUs are
    ``cpu``), store the columns and each row's kind; returns the rows understood."""
    from pkstrace.importers.common import _normalise_symbols, int_to_u64

    ret = np.asarray(pc.fill_null(pc.match_substring(args, " <- "), False))
    if ret.any():  # a return probe: not a call
        stats.count_unmodeled(f"{func} (return probe)", int(ret.sum()))
    fn, has_fn = _field(args, "func")
    caller, has_caller = _field(args, "caller")
    if func in QUEUE_FUNCS:
        tcpu_s, has_cpu = _field(args, "cpu")
        tcpu = np.asarray(pc.cast(pc.if_else(pa.array(has_cpu), tcpu_s, "-1"), pa.int64()))
        csd_s, has_csd = _field(args, "csd")
        csd, csd_ok = int_to_u64(pc.if_else(pa.array(has_csd), csd_s, "0"))
        # no csd argument is fine (the analysis matches by time), a garbled one is not
        csd_ok &= has_csd | ~np.asarray(pc.fill_null(pc.match_substring(args, "csd="), False))
        ok = has_cpu & has_fn & csd_ok & (tcpu >= 0) & (tcpu <= np.iinfo(np.int32).max) & ~ret
        local = ok & (tcpu == cpu)
        remote = ok & ~local
        cols["target_cpu"][rows[remote]] = tcpu[remote]
        cols["csd"][rows[remote]] = csd[remote]  # local: csd 0, as the tracepoint shows
        kind_codes[rows[remote]] = schema.KINDS.index(schema.Kind.CSD_QUEUE.value)
        kind_codes[rows[local]] = schema.KINDS.index(schema.Kind.CSD_ENTRY.value)
        has_caller &= remote  # a local call's entry carries no callsite
    else:
        mask_s, has_mask = _field(args, "mask")
        ok = has_mask & has_fn & ~ret
        sel = np.flatnonzero(ok)
        if len(sel):
            str_cols["cpumask"].assign(rows[sel], _mask_lists(mask_s.take(pa.array(sel))))
        kind_codes[rows[ok]] = schema.KINDS.index(schema.Kind.IPI_SEND.value)
    bad = int((~ok & ~ret).sum())
    if bad:
        stats.count_unparsed(f"bad arguments for {func}", bad)
    sel = np.flatnonzero(ok)
    if len(sel):
        str_cols["func"].assign(rows[sel], _normalise_symbols(fn.take(pa.array(sel)), True))
    sel = np.flatnonzero(ok & has_caller)
    if len(sel):
        str_cols["callsite"].assign(rows[sel],
                                    _normalise_symbols(caller.take(pa.array(sel)), False))
    return ok
