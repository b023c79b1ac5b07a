"""Replay the committed corpus: inputs that once crashed, hung or wrapped a number.

tests/corpus/<reader>/<file>; the file name says what went wrong before the fix
(tests/corpus/README.md lists the fixing commits). Each must now satisfy its
reader's contract (tests/fuzz/targets.py) and, through the CLI, exit 0 or exit 2
with one line, never a traceback. New failures found by a fuzzer or a property
test go in the same directories (the fuzz harnesses write crash-* files: rename
them to say what they broke).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fuzz.targets import (
    FIXTURES,
    check_calibration_bytes,
    check_pkstrace_bytes,
    check_text_bytes,
    memory_ceiling,
)

from pkstrace import cli

CORPUS = Path(__file__).parent / "corpus"
CHECKS = {"text": check_text_bytes, "pkstrace": check_pkstrace_bytes,
          "calibration": check_calibration_bytes}
FILES = sorted(p for p in CORPUS.glob("*/*") if p.parent.name in CHECKS and p.is_file())


@pytest.fixture(autouse=True)
def _bounded_memory() -> Any:
    with memory_ceiling(3 << 30):
        yield


def test_corpus_is_there() -> None:
    assert {p.parent.name for p in FILES} == set(CHECKS), FILES


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_corpus_input_meets_its_contract(path: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    CHECKS[path.parent.name](path.read_bytes())
    if path.parent.name == "calibration":
        argv = ["replay", str(FIXTURES / "ftrace_cpuid_2cpu.txt"), "--calibration", str(path)]
        commands = [argv]
    else:
        commands = [["replay", str(path)],
                    ["report", str(path), "-o", str(tmp_path / "r.html"), "--force"]]
    for argv in commands:
        rc = cli.main(argv)
        _, err = capsys.readouterr()
        assert "Traceback" not in err
        assert rc in (0, 2), (argv, rc, err[-500:])
        if rc == 2:
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith(f"pkstrace {argv[0]}: error: "), err
