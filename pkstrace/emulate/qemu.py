"""Boot the guest under QEMU (TCG: nested KVM does not work on this kind of host).

The guest gets three character devices: the serial console (ttyS0, kept as the
console log), and two virtio-serial ports whose host ends are plain files:
"pkstrace.events" carries the recorder's event stream, "pkstrace.results" the
driver's JSON results. (Raw ports, not virtio consoles: the hvc tty layer moved
only a few hundred trace lines a second under TCG.) No root is
needed. A kernel that panics, warns or hangs is a result: the console log is
kept and the outcome is classified, never turned into a traceback.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pkstrace.emulate.kernel import EmulateError

QEMU = "qemu-system-x86_64"
PANIC_RE = re.compile(r"Kernel panic - not syncing[^\n]*")
# An int3 oops in kernel text the tracer patched: under TCG a vCPU can run a
# stale translated block holding the int3 of a text_poke_bp() that has already
# finished (seen on QEMU 7.2 while tracepoints are enabled or disabled). It is
# an emulator artefact, not the scenario's result: the run is retried.
TCG_INT3_RE = re.compile(r"Oops: int3: ")
WARN_RE = re.compile(r"(WARNING: CPU: \d+ PID: \d+ at [^\n]*|BUG: [^\n]*|"
                     r"rcu: INFO: [^\n]*stall[^\n]*|watchdog: BUG: soft lockup[^\n]*|"
                     r"Oops: [^\n]*)")


@dataclass
class BootResult:
    # "ok"; "bug": it finished but the console shows BUG:/WARNING:/Oops/stall lines;
    # "panic"; "timeout": stopped after timeout_s; "error": QEMU failed;
    # "stall": stopped early because boot()'s give_up said so
    status: str
    wall_s: float
    console: Path
    events: Path
    results: Path
    command: list[str]
    panic: str = ""
    warnings: list[str] = field(default_factory=list)
    returncode: int | None = None
    tcg_int3: bool = False


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts over 9p (virtio): ``mount -t 9p -o
    trans=virtio TAG DIR``. Read-only unless ``writable``; QEMU runs as the caller, so
    the guest can read only what the caller can."""

    tag: str
    path: Path
    writable: bool = False

    def qemu_args(self) -> list[str]:
        ro = "" if self.writable else ",readonly=on"
        path = str(self.path).replace(",", ",,")  # QEMU option syntax
        return ["-fsdev", f"local,id={self.tag},path={path},security_model=none"
                          f"{ro},multidevs=remap",
                "-device", f"virtio-9p-pci,fsdev={self.tag},mount_tag={self.tag}"]


def memory_mb(cpus: int) -> int:
    # per-CPU trace buffers, per-CPU kernel data and the ~40 MB initramfs (twice)
    return max(1024, 640 + 48 * cpus)


def command(vmlinuz: Path, initrd: Path, cpus: int, append: str, workdir: Path,
            mem_mb: int | None = None, shares: Sequence[Share] = ()) -> list[str]:
    return [
        QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(cpus),
        "-m", str(mem_mb or memory_mb(cpus)), "-nographic", "-no-reboot",
        "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", append,
        "-device", "virtio-serial-pci",
        "-chardev", f"file,id=events,path={workdir / 'events.txt'}",
        "-device", "virtserialport,chardev=events,name=pkstrace.events",
        "-chardev", f"file,id=results,path={workdir / 'results.jsonl'}",
        "-device", "virtserialport,chardev=results,name=pkstrace.results",
        "-nic", "none",
        *(a for share in shares for a in share.qemu_args()),
    ]


def kernel_cmdline(isolated: str, extra: str = "") -> str:
    parts = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4", "tsc=reliable"]
    if isolated:
        parts += [f"isolcpus={isolated}", f"nohz_full={isolated}", f"rcu_nocbs={isolated}"]
    if extra:
        parts.append(extra)
    return " ".join(parts)


def _term_raises():  # noqa: ANN202 - returns the previous handler or None
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, on_term)


def _wait(proc: subprocess.Popen[bytes], deadline: float, console: Path,
          give_up: Callable[[str], bool] | None) -> int | None:
    """The guest's exit status; None if ``give_up`` stopped it (killed). Raises
    TimeoutExpired at the deadline."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, 0)
        try:
            return proc.wait(timeout=min(1.0, left) if give_up else left)
        except subprocess.TimeoutExpired:
            if give_up is None:
                continue
        if give_up(console.read_text(errors="replace")):
            proc.kill()  # our own child, by its handle
            return None


# A guest that stopped making progress: soft lockups and RCU stalls.
STALL_RE = re.compile(r"watchdog: BUG: soft lockup|rcu: INFO: rcu_\w+ (self-)?detected stall")


def boot(vmlinuz: Path, initrd: Path, cpus: int, append: str, workdir: Path,
         timeout_s: float, mem_mb: int | None = None, shares: Sequence[Share] = (),
         give_up: Callable[[str], bool] | None = None) -> BootResult:
    """Boot and wait for the guest to power off, at most ``timeout_s``.

    ``give_up(console_text)``, if given, is asked every second while the guest runs;
    True stops the guest at once with status "stall" (the caller decides what a
    stall at that point means, e.g. one while the tracer attached: boot again).
    """
    if shutil.which(QEMU) is None:
        raise EmulateError(f"{QEMU} not found (Debian package qemu-system-x86: run `make setup`)")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("events.txt", "results.jsonl", "console.log"):
        (workdir / name).unlink(missing_ok=True)
    cmd = command(vmlinuz, initrd, cpus, append, workdir, mem_mb, shares)
    console = workdir / "console.log"
    t0 = time.monotonic()
    status = "error"
    with open(console, "wb") as log:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
        except OSError as e:
            raise EmulateError(f"cannot start {QEMU}: {e.strerror}") from None
        # SIGTERM must not orphan the guest: turn it into an exception while we wait.
        old_term = _term_raises()
        try:
            rc = _wait(proc, t0 + timeout_s, console, give_up)
            if rc is None:
                status = "stall"
                rc = proc.wait()
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its handle
            rc = proc.wait()
            status = "timeout"
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
    wall = time.monotonic() - t0
    text = console.read_text(errors="replace")
    panic = PANIC_RE.search(text)
    warnings = WARN_RE.findall(text)
    if status not in ("timeout", "stall"):
        status = "panic" if panic else ("error" if rc != 0 else ("bug" if warnings else "ok"))
    return BootResult(status=status, wall_s=wall, console=console,
                      events=workdir / "events.txt", results=workdir / "results.jsonl",
                      command=cmd, panic=panic.group(0) if panic else "",
                      warnings=warnings[:20], returncode=rc,
                      tcg_int3=bool(TCG_INT3_RE.search(text)))
