"""Helpers shared by the benchmarks: host facts, git revision, CPU pinning, spinners.

Nothing here imports pandas or plotly; the benchmarks run on a quiet Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pkstrace.errors import InputError, KernelFeatureError

REPO_ROOT = Path(__file__).resolve().parents[2]


def host_facts() -> dict[str, Any]:
    """The host facts stored with every benchmark result (TraceMeta.host keys).

    The recorder's facts, plus ``virtualised`` (the CPU's ``hypervisor`` flag):
    IPIs in a VM cost VM exits, which every latency here includes.
    """
    from pkstrace.backends import hostfacts

    facts = dict(hostfacts.collect())
    facts["virtualised"] = "hypervisor" in (facts.get("cpu_flags") or [])
    return facts


def git_revision() -> str:
    """Short HEAD of the source tree, "-dirty" when tracked files differ, "" outside a checkout.

    Result files under benchmarks/results/ do not count: `make bench` rewrites them as it
    goes, which would mark every benchmark after the first as measured on a dirty tree."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        rev = git("rev-parse", "--short", "HEAD")
        if not rev:
            return ""
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)benchmarks/results")
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return rev + ("-dirty" if changed else "")


def percentiles(samples: np.ndarray) -> dict[str, float]:
    """p50/p90/p99 of a sample array (ns), as plain floats."""
    if len(samples) == 0:
        return {"p50_ns": float("nan"), "p90_ns": float("nan"), "p99_ns": float("nan")}
    p50, p90, p99 = np.percentile(samples, [50, 90, 99])
    return {"p50_ns": float(p50), "p90_ns": float(p90), "p99_ns": float(p99)}


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file, so a crash leaves no half file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    from pkstrace.tracefile import create_output, finish_output

    f, tmp = create_output(path, "w")  # under sudo: owned by the invoking user
    try:
        with f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            finish_output(f, tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist")
    from pkstrace.tracefile import create_output, finish_output

    f, tmp = create_output(path, "w")  # under sudo: owned by the invoking user
    try:
        with f:
            f.write(text)
            finish_output(f, tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run the calling thread on ``cpu`` only, restoring its affinity afterwards."""
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as e:
        raise InputError(f"cannot run on CPU {cpu}: {e.strerror}") from None
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# A process that spins on one CPU, so that CPU is busy (not idle) when called.
# PR_SET_PDEATHSIG: the kernel kills it if we die without cleaning up (kill -9).
_SPIN_PROCESS_SRC = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(1, 9)\n"
    "if os.getppid() != int(sys.argv[2]):\n"
    "    sys.exit(0)\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "sys.stdout.write('spinning\\n'); sys.stdout.flush()\n"
    "while True:\n"
    "    pass\n"
)


@contextlib.contextmanager
def spinning_process(cpu: int) -> Iterator[int]:
    """A child process spinning on ``cpu``; killed on exit (also on Ctrl-C / errors)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SPIN_PROCESS_SRC, str(cpu), str(os.getpid())],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        # Wait until it is pinned and running, so the first samples see a busy CPU.
        if proc.stdout is None or proc.stdout.readline() != b"spinning\n":
            raise KernelFeatureError(f"could not start a spinning process on CPU {cpu}")
        time.sleep(0.02)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# x86-64 machine code for
#     flag[1] = 1;                          /* tell Python we are in the loop */
#     do flag[2]++; while (flag[0] == 0);   /* heartbeat until told to stop */
# a spin loop that runs without Python's GIL (ctypes releases it around foreign
# calls), so a thread of *this* process occupies a CPU without slowing the
# measuring thread. No PAUSE: with a PAUSE in this loop, membarrier on this
# Firecracker guest interrupted almost none of the spinning CPUs (their CAL
# count in /proc/interrupts did not move; pause-loop exiting makes the vCPU
# yield), without it every one (measured 2026-11-26: CAL delta over 2000 calls).
#   c7 47 04 01 00 00 00   mov dword [rdi+4], 1
#   ff 47 08               inc dword [rdi+8]
#   8b 07                  mov eax, [rdi]
#   85 c0                  test eax, eax
#   74 f7                  jz -9 (back to inc)
#   c3                     ret
_SPIN_UNTIL_FLAG_X86_64 = bytes([0xC7, 0x47, 0x04, 0x01, 0x00, 0x00, 0x00,
                                 0xFF, 0x47, 0x08, 0x8B, 0x07, 0x85, 0xC0, 0x74, 0xF7, 0xC3])


class SpinningThreads:
    """Threads of this process spinning on given CPUs, GIL released, until stopped.

    ``membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`` interrupts exactly the CPUs
    that are *currently running* a thread of the calling process; these threads
    put one there. With ``realtime`` they ask for SCHED_FIFO (priority 1, root)
    so other tasks do not take their CPU; off by default, to be fair to other
    work on a shared host. Where another task runs on a spinner's CPU, that CPU
    is not interrupted: :meth:`all_running` says
    whether every spinner is on its CPU right now (its heartbeat moves), and
    :meth:`schedule_ins` how often they were switched in, so a caller can drop
    samples taken while one was not running.
    """

    def __init__(self, cpus: list[int], realtime: bool = False) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise KernelFeatureError("spinning threads need x86-64 (their loop is x86 code)")
        self.cpus = list(cpus)
        self.realtime = realtime
        self.policy = "SCHED_FIFO" if realtime else "SCHED_OTHER"
        self._code = mmap.mmap(-1, mmap.PAGESIZE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._code.write(_SPIN_UNTIL_FLAG_X86_64)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._code))
        self._spin = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addr)
        # Per thread: [stop, spinning (1, or -1 = could not pin), heartbeat].
        self._flags: list[ctypes.Array[ctypes.c_int]] = []
        self._threads: list[threading.Thread] = []
        self.tids: list[int] = []

    def _run(self, cpu: int, flags: ctypes.Array[ctypes.c_int]) -> None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            flags[1] = -1
            return
        if self.realtime:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            except OSError:
                self.policy = "SCHED_OTHER (SCHED_FIFO refused)"
        self._spin(ctypes.addressof(flags))

    def all_running(self, reads: int = 50) -> bool:
        """True if every spinner's heartbeat moves now (it is on its CPU)."""
        for f in self._flags:
            first = f[2]
            for _ in range(reads):
                if f[2] != first:
                    break
            else:
                return False
        return True

    def __enter__(self) -> SpinningThreads:
        try:
            for cpu in self.cpus:
                flags = (ctypes.c_int * 3)(0, 0, 0)
                t = threading.Thread(target=self._run, args=(cpu, flags), daemon=True,
                                     name=f"spin-cpu{cpu}")
                self._flags.append(flags)
                self._threads.append(t)
                t.start()
            deadline = time.monotonic() + 10
            while not all(f[1] for f in self._flags):
                if time.monotonic() > deadline:
                    raise KernelFeatureError("spinning threads did not start within 10 s "
                                             "(host overloaded?)")
                time.sleep(0.001)  # releases the GIL, so the threads can enter the loop
            if any(f[1] < 0 for f in self._flags):
                raise KernelFeatureError(f"cannot pin a spinning thread to CPUs {self.cpus}")
            self.tids = [t.native_id for t in self._threads if t.native_id is not None]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def schedule_ins(self) -> int:
        """How many times the spinners have been switched onto a CPU so far."""
        total = 0
        for tid in self.tids:
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[2])
            except (OSError, ValueError, IndexError):
                pass
        return total

    def __exit__(self, *exc: object) -> None:
        for f in self._flags:
            f[0] = 1
        for t in self._threads:
            t.join()
        self._threads.clear()
        # The code mapping lives as long as this object: a late thread must never
        # jump into unmapped memory.
