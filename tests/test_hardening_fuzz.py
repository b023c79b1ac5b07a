"""A short, bounded smoke run of each atheris harness (tests/fuzz/fuzz_*.py).

Proves the harnesses run and find nothing in a few hundred inputs; the real campaigns
are long runs by hand (commands in docs/hardening.md and in each harness).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from pkstrace import schema, tracefile

FUZZ = Path(__file__).parent / "fuzz"
FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = Path(__file__).parent / "corpus"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (pip install atheris; a wheel exists for CPython 3.11)")


def _seeds(tmp: Path, harness: str) -> list[str]:
    if harness == "text":
        return [str(FIXTURES), str(CORPUS / "text")]
    if harness == "calibration":
        return [str(CORPUS / "calibration")]
    from pkstrace.importers import open_trace

    d = tmp / "seeds"
    d.mkdir()
    t = open_trace(FIXTURES / "ftrace_cpuid_2cpu.txt")
    for n in (1, 50):
        tracefile.write_trace(d / f"s{n}.pkstrace",
                              schema.Trace(t.events.iloc[:n].reset_index(drop=True), t.meta))
    return [str(d), str(CORPUS / "pkstrace")]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("harness", ["text", "pkstrace", "calibration"])
def test_fuzz_harness_smoke(harness: str, tmp_path: Path) -> None:
    work = tmp_path / "corpus"
    work.mkdir()
    cmd = [sys.executable, str(FUZZ / f"fuzz_{harness}.py"), "-atheris_runs=500",
           "-max_total_time=30", "-max_len=4096", "-rss_limit_mb=3072", "-timeout=30",
           f"-artifact_prefix={tmp_path}/", str(work), *_seeds(tmp_path, harness)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("oom-*")) \
        + sorted(tmp_path.glob("timeout-*"))
    assert p.returncode == 0 and not crashes, (crashes, p.stderr[-3000:])
    assert "Done " in p.stderr, p.stderr[-1000:]
