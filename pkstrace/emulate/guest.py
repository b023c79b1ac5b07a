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
from typing import Any

EVENTS_PORT = "pkstrace.events"  # virtio-serial port names (see qemu.py)
RESULTS_PORT = "pkstrace.results"
CONTROL = "/sys/kernel/debug/pks_test/control"
COUNTERS = "/sys/kernel/debug/pks_test/counters"
READY = "/tmp/pkstrace.ready"
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


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        cfg = json.load(f)
    results = open(port_device(RESULTS_PORT), "w", buffering=1)  # noqa: SIM115 (held for the whole run)

    def say(kind: str, **fields: Any) -> None:
        results.write(json.dumps({"type": kind, **fields}) + "\n")
        results.flush()

    say("facts", facts=host_facts())
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


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
