"""The guest kernel: Debian's newest 6.12 image and matching headers, through apt.

The archive moves on (6.12.N today, N+1 next month), so the version is looked up
with ``apt-cache search`` at set-up time, never written down here. The .debs are
fetched with ``apt-get download`` (no root needed) and unpacked with ``dpkg -x``
into the cache (``$PKSTRACE_CACHE`` or ``~/.cache/pkstrace``); a second run finds
them there and starts in seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pkstrace.errors import PkstraceError

# Debian's generic x86-64 flavour; "cloud" lacks NO_HZ_FULL knobs we want, "rt" changes
# preemption itself.
FLAVOUR = "amd64"
SERIES = "6.12"
_IMAGE_RE = re.compile(rf"^linux-image-({re.escape(SERIES)}\.\d+\+deb\d+)-{FLAVOUR}-unsigned$")


class EmulateError(PkstraceError):
    """The emulated host could not be set up or run."""


def cache_dir() -> Path:
    """Where downloads and builds are kept (``$PKSTRACE_CACHE`` wins)."""
    env = os.environ.get("PKSTRACE_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "pkstrace"
    base.mkdir(parents=True, exist_ok=True)
    return base


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked kernel: what QEMU boots and what modules are built against."""

    release: str  # uname -r in the guest, e.g. "6.12.117+deb12-amd64"
    vmlinuz: Path
    headers: Path | None  # build directory (linux-headers-<release>); None for --kernel
    config: Path | None

    @property
    def buildable(self) -> bool:
        return self.headers is not None and (self.headers / "Makefile").exists()


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 900) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise EmulateError(f"{cmd[0]} not found (run `make setup`)") from None
    except subprocess.TimeoutExpired:
        raise EmulateError(f"{' '.join(cmd[:3])} timed out after {timeout:.0f} s") from None
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise EmulateError(f"{' '.join(cmd[:3])} failed: {msg}")
    return p.stdout


def _version_key(abi: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", abi))


def resolve_version() -> str:
    """The newest Debian ``6.12.N+debM`` ABI name apt knows, e.g. ``6.12.117+deb12``."""
    out = _run(["apt-cache", "search", "--names-only",
                rf"^linux-image-{SERIES}\..*-{FLAVOUR}-unsigned$"])
    abis = [m.group(1) for line in out.splitlines()
            if (m := _IMAGE_RE.match(line.split(" ", 1)[0]))]
    if not abis:
        raise EmulateError(f"apt knows no linux-image-{SERIES}.*-{FLAVOUR}-unsigned package "
                           "(is the Debian security/updates archive in sources.list? "
                           "try apt-get update)")
    return max(abis, key=_version_key)


def _packages(abi: str) -> list[str]:
    return [
        f"linux-image-{abi}-{FLAVOUR}-unsigned",
        f"linux-headers-{abi}-{FLAVOUR}",
        f"linux-headers-{abi}-common",
        f"linux-kbuild-{abi}",
    ]


def cached_versions() -> list[str]:
    """ABI names of the Debian kernels already unpacked in the cache, oldest first."""
    root = cache_dir() / "kernel"
    return sorted((p.name for p in root.glob(f"{SERIES}.*") if (p / ".done").exists()),
                  key=_version_key)


def ensure_debian_kernel(abi: str | None = None, log=print) -> GuestKernel:
    """Download (once) and unpack Debian's kernel image, headers and kbuild.

    Without ``abi``: the newest version apt knows. Where that one cannot be fetched
    (offline, or apt's lists name a version the archive has dropped) and an older
    one is cached, the cached one is used and the reason logged.
    """
    if abi is not None:
        return _install(abi, log)
    cached = cached_versions()
    try:
        abi = resolve_version()
    except EmulateError:
        if not cached:
            raise
        return _install(cached[-1], log)  # offline: the newest one we already have
    try:
        return _install(abi, log)
    except EmulateError as e:
        if not cached or abi in cached:
            raise
        log(f"emulate: {e}; using the cached {cached[-1]}")
        return _install(cached[-1], log)


def _install(abi: str, log: Callable[[str], None]) -> GuestKernel:
    dest = cache_dir() / "kernel" / abi
    release = f"{abi}-{FLAVOUR}"
    if not (dest / ".done").exists():
        debs = cache_dir() / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        pkgs = _packages(abi)
        missing = [p for p in pkgs if not list(debs.glob(f"{p}_*.deb"))]
        if missing:
            log(f"emulate: downloading {', '.join(missing)} (once; cached in {debs})")
            try:
                _run(["apt-get", "download", "-q", *missing], cwd=debs)
            except EmulateError as e:
                raise EmulateError(f"{e} (apt's package lists may be out of date: "
                                   "apt-get update)") from None
        tmp = dest.parent / f".{abi}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for p in pkgs:
            deb = sorted(debs.glob(f"{p}_*.deb"))[-1]
            _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        _relocate_headers(tmp, abi)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        (dest / ".done").write_text(release + "\n")
    k = GuestKernel(
        release=release,
        vmlinuz=dest / "boot" / f"vmlinuz-{release}",
        headers=dest / "usr" / "src" / f"linux-headers-{release}",
        config=dest / "boot" / f"config-{release}",
    )
    if not k.vmlinuz.exists():
        raise EmulateError(f"{k.vmlinuz}: missing from the unpacked kernel package")
    return k


def _relocate_headers(tree: Path, abi: str) -> None:
    """The headers' Makefile includes ``/usr/src/...-common`` by absolute path; point it
    at the unpacked copy so no system-wide install is needed."""
    mk = tree / "usr" / "src" / f"linux-headers-{abi}-{FLAVOUR}" / "Makefile"
    if mk.exists():
        text = mk.read_text()
        mk.write_text(text.replace("/usr/src/", f"{tree.parent / abi}/usr/src/"))


def kernel_from_path(path: str | os.PathLike[str]) -> GuestKernel:
    """``--kernel DEB|BZIMAGE``: a .deb is unpacked into the cache; a bzImage is used as is.

    Any other kernel has no matching headers here, so the PKS module can only be
    built when a ``linux-headers`` tree sits beside a .deb of the same release.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise EmulateError(f"{p}: no such kernel file")
    if p.suffix == ".deb":
        dest = cache_dir() / "kernel" / f"deb-{p.stem}"
        if not (dest / ".done").exists():
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            _run(["dpkg-deb", "-x", str(p), str(dest)])
            (dest / ".done").write_text("\n")
        images = sorted((dest / "boot").glob("vmlinuz-*"))
        if not images:
            raise EmulateError(f"{p}: no boot/vmlinuz-* inside")
        release = images[-1].name.removeprefix("vmlinuz-")
        hdr = _find_headers_for(release)
        return GuestKernel(release, images[-1], hdr, dest / "boot" / f"config-{release}")
    with open(p, "rb") as f:
        head = f.read(0x210)
    if len(head) < 0x206 or head[0x202:0x206] != b"HdrS":
        raise EmulateError(f"{p}: neither a .deb nor an x86 bzImage")
    release = _bzimage_release(p)
    return GuestKernel(release, p, _find_headers_for(release), None)


def _bzimage_release(p: Path) -> str:
    # The kernel version string sits at setup_header.kernel_version + 0x200.
    with open(p, "rb") as f:
        data = f.read(0x8000)
    off = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    if 0x200 < off < len(data):
        return data[off:off + 64].split(b" ", 1)[0].decode("ascii", "replace")
    return "unknown"


def _find_headers_for(release: str) -> Path | None:
    for base in (cache_dir() / "kernel").glob("*/usr/src"):
        cand = base / f"linux-headers-{release}"
        if (cand / "Makefile").exists():
            return cand
    cand = Path("/usr/src") / f"linux-headers-{release}"
    return cand if (cand / "Makefile").exists() else None


def module_path(kernel: GuestKernel, relpath: str) -> Path | None:
    """A module of the kernel's own package, e.g. ``fs/9p/9p``: its .ko or .ko.xz under
    the unpacked lib/modules/<release>/kernel (None for a bare bzImage or if absent)."""
    base = kernel.vmlinuz.parent.parent / "lib" / "modules" / kernel.release / "kernel"
    for suffix in (".ko", ".ko.xz"):
        p = base / f"{relpath}{suffix}"
        if p.is_file():
            return p
    return None
