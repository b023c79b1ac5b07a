"""Shared test helpers. Skips state the missing hardware/kernel feature, never just 'skip'."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TRACEFS = Path("/sys/kernel/tracing")


def ensure_tracefs() -> bool:
    if (TRACEFS / "events").is_dir():
        return True
    if os.geteuid() != 0:
        return False
    os.system("mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null")
    return (TRACEFS / "events").is_dir()


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_SYS_ADMIN/CAP_BPF) to attach to the running kernel")


@pytest.fixture
def require_tracefs(require_root: None) -> Path:
    if not ensure_tracefs():
        pytest.skip("tracefs cannot be mounted on this kernel")
    return TRACEFS


@pytest.fixture
def require_cross_cpu() -> None:
    if not os.path.exists("/dev/cpu/1/cpuid"):
        pytest.skip("needs /dev/cpu/1/cpuid (CONFIG_X86_CPUID and a second CPU) "
                    "to generate real cross-CPU calls")
