"""Facts about the traced host, for TraceMeta.host: CPUs, isolation, idle states, PKS.

Standard library plus psutil (when importable), reading sysfs and /proc, so that
it also runs in the emulated guest: ``python3 -m pkstrace.backends.hostfacts``
prints the facts as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from typing import Any

SYS_CPU = "/sys/devices/system/cpu"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def parse_cpulist(text: str) -> list[int]:
    """Kernel CPU list ("0-3,6") -> [0, 1, 2, 3, 6]; stdlib twin of schema.parse_cpulist."""
    cpus: set[int] = set()
    for part in (text or "").strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        else:
            cpus.add(int(part))
    return sorted(cpus)


def cpuinfo() -> tuple[str, list[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo."""
    model, flags = "", []
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = val.strip()
        elif key == "flags" and not flags:
            flags = val.split()
        if model and flags:
            break
    return model, flags


def cpu_has_pks(flags: list[str] | None = None) -> bool:
    if flags is None:
        flags = cpuinfo()[1]
    return "pks" in flags


def online_cpus() -> list[int]:
    text = _read(f"{SYS_CPU}/online")
    if text:
        return parse_cpulist(text)
    try:
        import psutil

        return list(range(psutil.cpu_count() or 1))
    except ImportError:
        return list(range(os.cpu_count() or 1))


def isolated_cpus() -> list[int]:
    return parse_cpulist(_read(f"{SYS_CPU}/isolated"))


def nohz_full_cpus() -> list[int]:
    text = _read(f"{SYS_CPU}/nohz_full")
    # Without nohz_full the file reads "(null)" on some kernels.
    return parse_cpulist(text) if text and text[0].isdigit() else []


def cpuidle_states(cpu: int = 0) -> list[dict[str, Any]]:
    """Idle states of one CPU: name, exit latency and target residency in µs."""
    base = f"{SYS_CPU}/cpu{cpu}/cpuidle"
    try:
        names = sorted(n for n in os.listdir(base) if n.startswith("state"))
    except OSError:
        return []
    out = []
    for n in sorted(names, key=lambda s: int(s[5:])):
        d = f"{base}/{n}"
        try:
            out.append({
                "name": _read(f"{d}/name"),
                "latency_us": int(_read(f"{d}/latency") or -1),
                "residency_us": int(_read(f"{d}/residency") or -1),
                "disabled": _read(f"{d}/disable") == "1",
            })
        except ValueError:
            continue
    return out


def collect(emulated: bool = False) -> dict[str, Any]:
    """The TraceMeta.host document for this machine."""
    model, flags = cpuinfo()
    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "arch": platform.machine(),
        "cpu_model": model,
        "cpu_flags": flags,
        "online_cpus": online_cpus(),
        "isolated_cpus": isolated_cpus(),
        "nohz_full_cpus": nohz_full_cpus(),
        "cpuidle": cpuidle_states(0),
        "cpuidle_driver": _read(f"{SYS_CPU}/cpuidle/current_driver"),
        "pks": cpu_has_pks(flags),
        "emulated": emulated,
        "cmdline": _read("/proc/cmdline"),
    }
    try:
        import psutil

        facts["memory_bytes"] = int(psutil.virtual_memory().total)
        facts["boot_time"] = float(psutil.boot_time())
    except ImportError:
        pass
    return facts


def main() -> int:
    print(json.dumps(collect(), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
