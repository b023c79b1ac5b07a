"""Load bcc-compiled programs as fentry (BPF trampoline) programs on kernel functions.

bcc 0.26 (Debian 12) can attach ``KFUNC_PROBE`` programs only to functions in
vmlinux BTF (it asks libbpf_find_vmlinux_btf_id), but write_pkrs may live in a
module (the emulated host's pks_test). So the bcc backend compiles plain
``BPF_PROG`` functions (probes/pkstrace.bpf.c, WITH_FENTRY) and this module loads
them itself: the instructions bcc produced (maps already resolved), program type
TRACING / BPF_TRACE_FENTRY, ``attach_btf_id`` = the function's id in vmlinux BTF
or in its module's split BTF (/sys/kernel/btf/<module>, built by pahole), with
``attach_btf_obj_fd`` naming the module's BTF object; then BPF_RAW_TRACEPOINT_OPEN
attaches it. Closing the returned link fd detaches it.

Standard library only (ctypes + the bpf(2) syscall), like checks.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from pkstrace.backends.checks import (
    BPF_PROG_LOAD,
    BPF_PROG_TYPE_TRACING,
    BPF_TRACE_FENTRY,
    BTF_FUNC,
    BTF_VMLINUX,
    SYS_BPF,
    btf_func_id,
    btf_name_offset,
    btf_sections,
    btf_types,
    read_btf,
)

BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_BTF_GET_FD_BY_ID = 19
BPF_BTF_GET_NEXT_ID = 23
BTF_DIR = "/sys/kernel/btf"
LOG_BYTES = 1 << 16  # verifier log, asked for only after a failed load


class FentryError(Exception):
    """A program could not be loaded or attached (one line, for ProbeResult.reason)."""


@dataclass
class FentryLink:
    symbol: str
    prog_name: str
    prog_fd: int
    link_fd: int
    btf: str  # "vmlinux" or the module name

    def close(self) -> None:
        for fd in (self.link_fd, self.prog_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


_libc = None


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    """bpf(2); returns the result or raises OSError with errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    ret = _libc.syscall(SYS_BPF, cmd, attr, len(attr))
    if ret < 0:
        e = ctypes.get_errno() or errno.EINVAL
        raise OSError(e, os.strerror(e))
    return ret


def module_btf_func_id(name: str, module: str) -> int:
    """Type id of FUNC ``name`` in a module's split BTF (ids and string offsets
    continue those of vmlinux BTF); 0 if absent."""
    base, data = read_btf(BTF_VMLINUX), read_btf(f"{BTF_DIR}/{module}")
    if base is None or data is None:
        return 0
    pos = btf_name_offset(btf_sections(data)[0], name)
    if pos < 0:
        return 0
    want = len(btf_sections(base)[0]) + pos
    base_types = sum(1 for _ in btf_types(base))
    for tid, t in enumerate(btf_types(data), base_types + 1):
        if t.kind == BTF_FUNC and t.name_off == want:
            return tid
    return 0


def module_of(symbol: str, kallsyms: str = "/proc/kallsyms") -> str | None:
    """The module a text symbol lives in ("[pks_test]" in kallsyms), None for vmlinux."""
    try:
        with open(kallsyms) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[2] == symbol and parts[1] in "tTwW":
                    return parts[3].strip("[]")
    except OSError:
        pass
    return None


def btf_obj_fd(module: str) -> int:
    """An fd of the kernel BTF object named ``module`` (walks the loaded BTF ids)."""
    next_id = 0
    while True:
        attr = ctypes.create_string_buffer(16)
        struct.pack_into("<I", attr, 0, next_id)
        try:
            _bpf(BPF_BTF_GET_NEXT_ID, attr)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise FentryError(f"no loaded BTF object named {module}") from None
            raise FentryError(f"BPF_BTF_GET_NEXT_ID: {e.strerror}") from None
        next_id = struct.unpack_from("<I", attr, 4)[0]
        attr = ctypes.create_string_buffer(16)
        struct.pack_into("<I", attr, 0, next_id)
        try:
            fd = _bpf(BPF_BTF_GET_FD_BY_ID, attr)
        except OSError:
            continue  # freed meanwhile
        name = ctypes.create_string_buffer(64)
        info = ctypes.create_string_buffer(32)
        struct.pack_into("<QI", info, 16, ctypes.addressof(name), len(name))
        attr = ctypes.create_string_buffer(16)
        struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
        try:
            _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
            kernel_btf = struct.unpack_from("<I", info, 28)[0]
            if kernel_btf and name.value.decode(errors="replace") == module:
                return fd
        except OSError:
            pass
        os.close(fd)


def attach_target(symbol: str) -> tuple[int, int, str]:
    """(attach_btf_id, attach_btf_obj_fd or 0, "vmlinux"/module) for ``symbol``."""
    module = module_of(symbol)
    if module is None:
        tid = btf_func_id(symbol)
        if not tid:
            raise FentryError(f"{symbol} is not a FUNC in vmlinux BTF")
        return tid, 0, "vmlinux"
    if not os.path.exists(f"{BTF_DIR}/{module}"):
        raise FentryError(f"module {module} has no BTF ({BTF_DIR}/{module} missing: "
                          "built without pahole / CONFIG_DEBUG_INFO_BTF_MODULES)")
    tid = module_btf_func_id(symbol, module)
    if not tid:
        raise FentryError(f"{symbol} is not a FUNC in {module}'s BTF")
    return tid, btf_obj_fd(module), module


def load_and_attach(insns: int, insns_len: int, license_: bytes, prog_name: str,
                    symbol: str) -> FentryLink:
    """Load ``insns_len`` bytes of instructions at address ``insns`` as an fentry
    program on ``symbol`` and attach it. Raises FentryError with one line."""
    tid, obj_fd, where = attach_target(symbol)
    lic = ctypes.create_string_buffer(license_)

    def prog_load(log: ctypes.Array | None) -> int:
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("<IIQQ", attr, 0, BPF_PROG_TYPE_TRACING, insns_len // 8, insns,
                         ctypes.addressof(lic))
        if log is not None:
            struct.pack_into("<IIQ", attr, 24, 1, len(log), ctypes.addressof(log))
        pname = prog_name.encode()[:15]
        attr[48:48 + len(pname)] = pname
        struct.pack_into("<I", attr, 68, BPF_TRACE_FENTRY)
        struct.pack_into("<II", attr, 108, tid, obj_fd)
        return _bpf(BPF_PROG_LOAD, attr)

    try:
        try:
            prog_fd = prog_load(None)
        except OSError as e:
            log = ctypes.create_string_buffer(LOG_BYTES)  # again, for the verifier's word
            with contextlib.suppress(OSError):
                os.close(prog_load(log))
            lines = log.value.decode(errors="replace").splitlines()
            # the verifier's verdict is the line before its "processed N insns" summary
            end = next((i for i, ln in enumerate(lines) if ln.startswith("processed ")),
                       len(lines))
            why = f" ({lines[end - 1][:160]})" if end > 0 else ""
            raise FentryError(f"fentry load on {symbol} ({where} BTF id {tid}) failed: "
                              f"{errno.errorcode.get(e.errno, e.errno)}{why}") from None
    finally:
        if obj_fd:
            os.close(obj_fd)  # the loaded program holds its own reference
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<QI", attr, 0, 0, prog_fd)
    try:
        link_fd = _bpf(BPF_RAW_TRACEPOINT_OPEN, attr)
    except OSError as e:
        os.close(prog_fd)
        raise FentryError(f"fentry attach on {symbol} failed: "
                          f"{errno.errorcode.get(e.errno, e.errno)}") from None
    return FentryLink(symbol, prog_name, prog_fd, link_fd, where)
