"""The guest's initramfs: busybox-static, a minimal Python, pkstrace's own code.

Two cpio archives, concatenated (the kernel unpacks them in turn):
  * a base, cached by content: busybox, Debian's python3.11 with the shared
    libraries ``ldd`` names and a trimmed standard library;
  * a small per-run layer: /init, the PKS module, the pkstrace package source
    (so the recorder in the guest is the project's recorder, this very checkout)
    and the run's parameters.
The cpio "newc" format is written here directly: no root, no cpio binary, and
the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from pkstrace.emulate.kernel import EmulateError, cache_dir

BUSYBOX = Path("/bin/busybox")
GUEST_PYTHON = Path("/usr/bin/python3.11")  # Debian's: the one with a plain layout
STDLIB = Path("/usr/lib/python3.11")
PKSTRACE_SRC = Path(__file__).resolve().parents[1]  # the pkstrace package directory
# Parts of the standard library the guest never needs (size, not correctness).
STDLIB_SKIP = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "site-packages", "dist-packages", "venv", "config-3.11-x86_64-linux-gnu",
    "unittest", "sqlite3", "curses", "dbm", "xmlrpc", "wsgiref",
}
DYNLOAD_SKIP = re.compile(r"^(_test|xx|_ctypes_test|_tkinter|_curses|_dbm|_gdbm|_sqlite3|"
                          r"readline|nis|ossaudiodev|audioop)")


class Cpio:
    """A cpio newc archive being written."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1000
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        self._ino += 1
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        blob = hdr.encode() + nb
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self._parts.append(blob)

    def dir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        parent = os.path.dirname(name)
        if parent:
            self.dir(parent)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def bytes(self) -> bytes:
        trailer = Cpio()
        trailer._entry("TRAILER!!!", 0)
        data = b"".join(self._parts) + trailer._parts[0]
        return data + b"\0" * (-len(data) % 512)


def _shared_libs(binary: Path) -> list[Path]:
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EmulateError(f"ldd {binary}: {e}") from None
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _stdlib_files() -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(STDLIB):
        rel = Path(dirpath).relative_to(STDLIB)
        if rel == Path("."):
            dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP]
        elif rel == Path("lib-dynload"):
            filenames = [f for f in filenames if not DYNLOAD_SKIP.match(f)]
        for f in filenames:
            if f.endswith((".py", ".so")) or (
                    rel.name == "__pycache__" and f.endswith(".cpython-311.pyc")):
                yield Path(dirpath) / f


def _base_key() -> str:
    h = hashlib.sha256()
    for p in (BUSYBOX, GUEST_PYTHON):
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(repr(sorted(STDLIB_SKIP)).encode() + DYNLOAD_SKIP.pattern.encode())
    h.update(b"v2")
    return h.hexdigest()[:16]


def base_archive(log=print) -> Path:
    """busybox + Python 3.11 + trimmed stdlib, built once."""
    for p in (BUSYBOX, GUEST_PYTHON):
        if not p.exists():
            raise EmulateError(f"{p} missing (Debian packages busybox-static, python3.11: "
                               "run `make setup`)")
    out = cache_dir() / "initramfs" / f"base-{_base_key()}.cpio"
    if out.exists():
        return out
    log("emulate: building the guest's base initramfs (busybox + python3.11)")
    c = Cpio()
    for d in ("bin", "sbin", "usr/bin", "proc", "sys", "dev", "tmp", "etc", "run",
              "lib/modules", "opt/pkstrace"):
        c.dir(d)
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("usr/bin/python3", GUEST_PYTHON.read_bytes(), 0o755)
    libs: dict[str, Path] = {}
    for lib in _shared_libs(GUEST_PYTHON):
        libs[str(lib)] = lib
    for f in _stdlib_files():
        c.file(str(f), f.read_bytes(), 0o755 if f.suffix == ".so" else 0o644)
        if f.suffix == ".so":
            for lib in _shared_libs(f):
                libs[str(lib)] = lib
    for name, lib in sorted(libs.items()):
        c.file(name, lib.resolve().read_bytes(), 0o755)
    # Python finds its prefix from its own path: /usr/bin/python3 -> /usr/lib/python3.11.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(c.bytes())
    tmp.rename(out)
    return out


def _package_files() -> Iterable[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(PKSTRACE_SRC):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if f.endswith(".py"):
                p = Path(dirpath) / f
                yield "opt/pkstrace/pkstrace/" + str(p.relative_to(PKSTRACE_SRC)), p


INIT_SCRIPT = """#!/bin/sh
# pkstrace emulated host: mount, load the PKS module, hand over to the scenario driver.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin PYTHONPATH=/opt/pkstrace PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tracefs nodev /sys/kernel/tracing
mount -t debugfs nodev /sys/kernel/debug
# drivers an older kernel has as modules (virtio console: the ports to the host)
for m in /lib/modules/early/*.ko; do [ -e "$m" ] && insmod "$m"; done
echo "pkstrace-guest: init up, loading pks_test $(cat /etc/pks_test.params)"
if insmod /lib/modules/pks_test.ko $(cat /etc/pks_test.params); then
    # the driver runs on a housekeeping CPU (0), never on the CPUs under test
    taskset -c 0 python3 -m pkstrace.emulate.guest /etc/pkstrace-run.json
    echo "pkstrace-guest: driver exited with status $?"
else
    echo "pkstrace-guest: insmod failed"
fi
echo "pkstrace-guest: powering off"
sync
poweroff -f
"""


def module_bytes(path: Path) -> bytes:
    """A kernel module's bytes, decompressed (busybox insmod takes plain ELF only)."""
    import lzma

    data = path.read_bytes()
    if path.suffix == ".xz":
        try:
            return lzma.decompress(data)
        except lzma.LZMAError as e:
            raise EmulateError(f"{path}: {e}") from None
    return data


def run_archive(dest: Path, module_ko: Path, module_params: str, run_config: dict,
                log=print, extra_modules: dict[str, Path] | None = None,
                early_modules: list[Path] | None = None) -> Path:
    """The full initramfs for one run: base + the run's layer, concatenated.

    ``extra_modules``: more kernel modules by name, stored as
    /lib/modules/extra/NAME.ko for the driver to load (in the order given).
    ``early_modules``: modules /init loads before anything else, in this order.
    """
    base = base_archive(log=log)
    c = Cpio()
    for i, path in enumerate(early_modules or []):
        c.file(f"lib/modules/early/{i:02d}-{path.name.split('.')[0]}.ko", module_bytes(path))
    for name, path in (extra_modules or {}).items():
        c.file(f"lib/modules/extra/{name}.ko", module_bytes(path))
    c.file("init", INIT_SCRIPT.encode(), 0o755)
    c.file("lib/modules/pks_test.ko", module_ko.read_bytes())
    c.file("etc/pks_test.params", module_params.encode() + b"\n")
    c.file("etc/pkstrace-run.json", json.dumps(run_config, indent=1).encode())
    for name, p in _package_files():
        c.file(name, p.read_bytes())
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out, open(base, "rb") as b:
        shutil.copyfileobj(b, out)
        out.write(c.bytes())
    return dest


if __name__ == "__main__":  # build the base archive: python -m pkstrace.emulate.initramfs
    print(base_archive())
    sys.exit(0)
