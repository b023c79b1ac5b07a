"""Build the PKS test module (probes/pks_module) against the guest kernel's headers.

The .ko is cached by a hash of the module's sources and the kernel release, so it
is rebuilt only when either changes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from pkstrace.emulate.kernel import EmulateError, GuestKernel, cache_dir

MODULE_SRC = Path(__file__).resolve().parents[2] / "probes" / "pks_module"
MODULE_NAME = "pks_test"
COMPILER = "gcc-12"  # what Debian's 6.12 was built with (see .kernelvariables)


def _sources() -> list[Path]:
    return sorted(f for f in MODULE_SRC.iterdir()
                  if f.is_file() and (f.suffix in (".c", ".h") or f.name == "Kbuild"))


def with_btf(kernel: GuestKernel) -> bool:
    """Whether the module gets BTF (fentry on its functions needs it): pahole (Debian
    package dwarves) and the headers' vmlinux, which Debian ships there as the BTF base
    for out-of-tree modules (Kbuild skips module BTF without it)."""
    return (shutil.which("pahole") is not None and kernel.headers is not None
            and (kernel.headers / "vmlinux").is_file())


def source_hash(release: str, btf: bool = False) -> str:
    h = hashlib.sha256(release.encode() + (b"\0btf" if btf else b""))
    for f in _sources():
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def build_module(kernel: GuestKernel, log=print) -> Path:
    """The module's .ko for ``kernel``, built once per source hash."""
    if not kernel.buildable:
        raise EmulateError(f"no kernel headers for {kernel.release}: the PKS module cannot "
                           "be built (use Debian's kernel, or put its linux-headers beside it)")
    if not (MODULE_SRC / f"{MODULE_NAME}.c").exists():
        raise EmulateError(f"{MODULE_SRC}: module sources missing")
    btf = with_btf(kernel)
    out = cache_dir() / "modules" / f"{MODULE_NAME}-{source_hash(kernel.release, btf)}.ko"
    if out.exists():
        return out
    if shutil.which(COMPILER) is None:
        raise EmulateError(f"{COMPILER} not found (it must match the guest kernel's compiler; "
                           "run `make setup`)")
    log(f"emulate: building {MODULE_NAME}.ko against {kernel.release}")
    with tempfile.TemporaryDirectory(prefix="pks_module.") as tmp:
        for f in _sources():
            shutil.copy2(f, tmp)
        # BTF (for fentry on the module's functions) where pahole is installed;
        # kprobes do not need it, so without pahole the module is built without.
        cmd = ["make", "-C", str(kernel.headers), f"M={tmp}", f"CC={COMPILER}",
               *([] if btf else ["CONFIG_DEBUG_INFO_BTF_MODULES="]), "modules"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        ko = Path(tmp) / f"{MODULE_NAME}.ko"
        if p.returncode != 0 or not ko.exists():
            errs = [ln for ln in (p.stderr + p.stdout).splitlines() if "error" in ln.lower()]
            raise EmulateError(f"module build failed: {(errs or ['see make output'])[0][:200]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".tmp")
        shutil.copy2(ko, tmp_out)
        tmp_out.rename(out)
    return out
