"""The scenario driver that runs INSIDE the emulated guest (stdlib only).

The guest's /init loads the PKS module and runs ``python3 -m pkstrace.emulate.guest
/etc/pkstrace-run.json``. This driver records nothing itself: it starts the
project's recorder (``python3 -m pkstrace.backends.tracefs``) streaming raw ftrace
lines to the virtio-serial port "pkstrace.events" (a file on the host), so events leave
the guest as they are produced, even if the kernel then dies; it then starts the
scenario, stops the recorder, and reports host facts and the module's counters on
the port "pkstrace.results" as JSON lines ``{"type": ..., ...}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

EVENTS_PORT = "pkstrace.events"  # virtio-serial port names (see qemu.py)
RESULTS_PORT = "pkstrace.results"
CONTROL = "/sys/kernel/debug/pks_test/control"
COUNTERS = "/sys/kernel/debug/pks_test/counters"
READY = "/tmp/pkstrace.ready"
PARAMS = "/etc/pks_test.params"  # the module's parameters (initramfs.INIT_SCRIPT)
STOP = "/tmp/pkstrace.stop"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def port_device(name: str) -> str:
    """/dev node of the virtio-serial port called ``name`` (no udev in the guest)."""
    base = "/sys/class/virtio-ports"
    for port in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if _read(f"{base}/{port}/name") == name:
            return f"/dev/{port}"
    raise OSError(f"no virtio-serial port named {name}")


def host_facts() -> dict[str, Any]:
    """The guest's facts, in the keys schema.TraceMeta.host documents (CPU lists as text;
    the host side parses them with schema.parse_cpulist)."""
    model, flags = "", []
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1].split()
    return {
        "hostname": os.uname().nodename,
        "kernel": os.uname().release,
        "kernel_version": os.uname().version,
        "cpu_model": model,
        "cpu_flags": flags,
        "online": _read("/sys/devices/system/cpu/online"),
        "isolated": _read("/sys/devices/system/cpu/isolated"),
        "nohz_full": _read("/sys/devices/system/cpu/nohz_full"),
        "cmdline": _read("/proc/cmdline"),
    }


def run_scenario(say: Callable[..., None]) -> None:
    """Start the module's scenario (it returns when done) and report its counters."""
    t1 = time.monotonic()
    try:
        with open(CONTROL, "w") as f:
            f.write("run\n")
        run_error = ""
    except OSError as e:
        run_error = f"{CONTROL}: {e.strerror}"
    t2 = time.monotonic()
    say("ran", run_s=round(t2 - t1, 6), error=run_error)
    # Counters first: they are final once the run is over, and tearing the
    # probes down patches kernel text again (see qemu.TCG_INT3_RE).
    counters = _read(COUNTERS)
    try:
        say("counters", counters=json.loads(counters))
    except ValueError:
        say("error", message="unreadable module counters", raw=counters[:2000])


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        cfg = json.load(f)
    results = open(port_device(RESULTS_PORT), "w", buffering=1)  # noqa: SIM115 (held for the whole run)

    def say(kind: str, **fields: Any) -> None:
        results.write(json.dumps({"type": kind, **fields}) + "\n")
        results.flush()

    say("facts", facts=host_facts())
    if cfg.get("backend") == "bcc":
        return main_bcc(cfg, say)
    cmd = [sys.executable, "-m", "pkstrace.backends.tracefs", "--out", port_device(EVENTS_PORT),
           "--events", ",".join(cfg["events"]), "--msr", cfg["msr"],
           "--buffer-kb", str(cfg["buffer_kb"]), "--clock", cfg["clock"],
           "--stop-file", STOP, "--ready-file", READY]
    for kp in cfg["kprobes"]:
        cmd += ["--kprobe", kp]
    t0 = time.monotonic()
    rec = subprocess.Popen(cmd)
    while not os.path.exists(READY):
        if rec.poll() is not None:
            say("error", message=f"recorder exited with status {rec.returncode} before tracing")
            return 1
        if time.monotonic() - t0 > cfg["ready_timeout_s"]:
            rec.terminate()
            say("error", message="recorder not ready in time")
            return 1
        time.sleep(0.05)
    say("recording", attach_s=round(time.monotonic() - t0, 3))
    run_scenario(say)
    time.sleep(cfg.get("settle_s", 0.3))  # the recorder's last read sees the tail
    with open(STOP, "w"):
        pass
    try:
        rec.wait(timeout=cfg["stop_timeout_s"])
    except subprocess.TimeoutExpired:
        say("error", message=f"recorder still streaming {cfg['stop_timeout_s']} s after "
                             "the stop request; stopped with SIGTERM")
        rec.terminate()
        try:
            rec.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rec.kill()
            rec.wait()
    say("done", recorder_status=rec.returncode)
    results.close()
    return 0



# --- the bcc backend: the host's own Python, bcc and pkstrace over 9p -----------------
#
# bcc needs clang, LLVM and Python packages far too big for the initramfs, so the
# guest mounts the host's /usr, /etc, the project tree and the kernel cache read-only
# over 9p (qemu.Share) at their host paths on a tmpfs root, and runs the project's
# real `pkstrace record --backend bcc` chrooted there. The trace is written to a
# writable share of the run directory. bcc finds the GUEST kernel's headers through
# /lib/modules/<release>/build, a tmpfs over the host's (read-only) /lib/modules that
# exists only inside the guest.
HOST_ROOT = "/hostroot"
NINEP_OPTS = "trans=virtio,version=9p2000.L,msize=512000"
READY_LINE = "probes attached"  # what `pkstrace record` prints once it records


def _sh(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or [f"status {p.returncode}"])[-1]
        raise OSError(f"{' '.join(cmd)}: {msg}")


def mount_host_root(root: dict[str, Any]) -> None:
    """Build HOST_ROOT from the 9p shares (see the block comment above)."""
    for name in root["modules"]:
        _sh("insmod", f"/lib/modules/extra/{name}.ko")
    os.makedirs(HOST_ROOT, exist_ok=True)
    _sh("mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", HOST_ROOT)
    for name, target in root["links"]:
        os.symlink(target, HOST_ROOT + name)

    def mount(fstype: str, at: str) -> None:
        os.makedirs(HOST_ROOT + at, exist_ok=True)  # on a tmpfs, or already there
        _sh("mount", "-t", fstype, fstype, HOST_ROOT + at)

    # The guest's own /proc, /sys, /dev and /tmp first: a share may live under /tmp
    # (a clone in /tmp/x, PKSTRACE_CACHE=/tmp/...) and is then mounted on this tmpfs.
    for fstype, at in (("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev"),
                       ("tmpfs", "/tmp"), ("tracefs", "/sys/kernel/tracing"),
                       ("debugfs", "/sys/kernel/debug")):
        mount(fstype, at)
    for tag, path, writable in root["shares"]:
        at = HOST_ROOT + path
        os.makedirs(at, exist_ok=True)
        # cache=loose: the read-only trees do not change during a run, and every
        # uncached 9p lookup is a round trip through the emulator
        _sh("mount", "-t", "9p", "-o",
            NINEP_OPTS + ("" if writable else ",ro,cache=loose"), tag, at)
    mount("tmpfs", "/lib/modules")  # over the host's, after /usr is there
    release = os.uname().release
    mods = f"{HOST_ROOT}/lib/modules/{release}"
    os.makedirs(mods)
    os.symlink(root["kernel_build"], f"{mods}/build")
    os.symlink(root["kernel_source"], f"{mods}/source")


def main_bcc(cfg: dict[str, Any], say: Callable[..., None]) -> int:
    """Record with the host's `pkstrace record --backend bcc`, chrooted (see above),
    once per entry of cfg["recorders"]; between two, the PKS module is loaded afresh
    (it runs its scenario once per load). Each result line carries its "run" index."""
    t0 = time.monotonic()
    try:
        mount_host_root(cfg["host_root"])
    except OSError as e:
        say("error", message=f"host root over 9p: {e}")
        return 1
    say("host_root", mount_s=round(time.monotonic() - t0, 3))
    for i, argv in enumerate(cfg["recorders"]):
        def say_run(kind: str, _i: int = i, **fields: Any) -> None:
            say(kind, run=_i, **fields)

        if i:
            try:
                _sh("rmmod", "pks_test")
                _sh("insmod", "/lib/modules/pks_test.ko", *_read(PARAMS).split())
            except OSError as e:
                say_run("error", message=f"reloading the PKS module: {e}")
                return 1
        if not record_once(cfg, argv, say_run):
            return 1
    return 0


def record_once(cfg: dict[str, Any], argv: list[str], say: Callable[..., None]) -> bool:
    """One recording of one scenario run; False if the recorder never got going."""
    import signal
    import threading

    cmd = ["chroot", HOST_ROOT, "/usr/bin/env", *cfg["recorder_env"], *argv]
    t0 = time.monotonic()
    rec = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, bufsize=1)
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:  # the recorder's stderr: to the console, and to the host
        assert rec.stderr is not None
        for line in rec.stderr:
            sys.stderr.write("pkstrace-guest: recorder: " + line)
            if line.startswith("pkstrace record:"):
                lines.append(line.rstrip("\n"))
                if READY_LINE in line:
                    ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    # Polls counted, not clock time: under TCG on a loaded host the guest's clock
    # has been seen to jump by ~1000 s at once (with RCU stall reports), which
    # would end a clock-time wait at once. The host's timeout bounds a real hang.
    polls = 0
    while not ready.wait(0.1):
        polls += 1
        if rec.poll() is not None:
            reader.join(5)
            say("error", message=f"recorder exited with status {rec.returncode} before "
                                 f"tracing: {(lines or ['no output'])[-1]}")
            return False
        if polls * 0.1 > cfg["ready_timeout_s"]:
            rec.kill()
            rec.wait()
            say("error", message="recorder not ready in time")
            return False
    say("recording", attach_s=round(time.monotonic() - t0, 3))
    run_scenario(say)
    time.sleep(cfg.get("settle_s", 0.3))
    rec.send_signal(signal.SIGINT)  # as Ctrl-C: detach, write the trace
    try:
        rec.wait(timeout=cfg["stop_timeout_s"])
    except subprocess.TimeoutExpired:
        say("error", message=f"recorder still running {cfg['stop_timeout_s']} s after "
                             "SIGINT; killed")
        rec.kill()
        rec.wait()
    reader.join(5)
    say("recorder", lines=lines)
    say("done", recorder_status=rec.returncode)
    return True


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
