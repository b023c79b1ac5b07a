"""Pick and build a backend: `--backend auto|bcc|perf|tracefs`."""

from __future__ import annotations

from collections.abc import Sequence

from pkstrace.backends.base import Backend, ProbeSpec, RecordOptions
from pkstrace.backends.checks import backend_problem
from pkstrace.errors import InputError, KernelFeatureError

BACKENDS = ("bcc", "perf", "tracefs")
# Why each is preferred, best first (what `auto` says).
STRENGTHS = {
    "bcc": "filters and counts in the kernel, ring buffer, ns timestamps",
    "perf": "no compiler or headers needed, ns timestamps",
    "tracefs": "pure Python, works wherever tracefs does (µs timestamps)",
}


def choose(requested: str, mode: str) -> tuple[str, str]:
    """(backend name, one-line reason). Raises KernelFeatureError if none can run."""
    if requested not in ("auto", *BACKENDS):
        raise InputError(f"unknown backend {requested!r} (choose auto, bcc, perf or tracefs)")
    if mode == "counts" and requested not in ("auto", "bcc"):
        raise InputError(f"--mode counts counts in the kernel and needs --backend bcc, "
                         f"not {requested}")
    if requested != "auto":
        problem = backend_problem(requested)
        if problem:
            raise KernelFeatureError(f"backend {requested} cannot run here: {problem}")
        return requested, f"{requested} (asked for)"
    candidates = ("bcc",) if mode == "counts" else BACKENDS
    strengths = dict(STRENGTHS)
    if mode == "events" and pks_functions_present():
        # On a PKS kernel the preempt-count drift of a global update is the point,
        # and only ftrace's flags column carries the preempt depth.
        candidates = ("tracefs", "bcc", "perf")
        strengths["tracefs"] = ("the kernel has write_pkrs / a global update: only tracefs "
                                "records the preempt depth that drift findings need")
    skipped = []
    for name in candidates:
        problem = backend_problem(name)
        if not problem and name == "perf":
            # Measured, not assumed (a short cross-CPU call burst): a kernel whose
            # perf events miss what idle CPUs do would record half of every call.
            from pkstrace.backends.checks import perf_samples_idle_cpus

            ok, why = perf_samples_idle_cpus()
            if ok is False:
                problem = f"perf samples idle CPUs: {why}"
        if not problem:
            why = f"auto: {name} ({strengths[name]})"
            if skipped:
                why += "; not " + "; not ".join(skipped)
            return name, why
        skipped.append(f"{name}: {problem}")
    raise KernelFeatureError("no backend can record here: " + "; ".join(skipped))


def pks_functions_present() -> bool:
    from pkstrace import schema
    from pkstrace.backends.symbols import function_names

    names = function_names() or set()
    return any(f in names for f in (*schema.WRITE_PKRS_FUNCS, *schema.GLOBAL_UPDATE_FUNCS))


def create(name: str, specs: Sequence[ProbeSpec], opts: RecordOptions,
           bpf_buffer: str = "auto", bpf_attach: str = "auto") -> Backend:
    """The backend ``name``; ``bpf_buffer`` (bcc events mode) is auto, ring or perf;
    ``bpf_attach`` (bcc) auto, raw or tp."""
    if name == "tracefs":
        from pkstrace.backends.tracefs import TracefsBackend

        return TracefsBackend(specs, cpus=opts.cpus, buffer_kb=opts.buffer_kb)
    if name == "perf":
        from pkstrace.backends.perf import PerfBackend

        return PerfBackend(specs, cpus=opts.cpus)
    if name == "bcc":
        from pkstrace.backends.bcc import BccBackend

        return BccBackend(specs, cpus=opts.cpus, mode=opts.mode, buffer_kb=opts.buffer_kb,
                          bpf_buffer=bpf_buffer, bpf_attach=bpf_attach)
    raise InputError(f"unknown backend {name!r}")
