"""atheris harness: the calibration JSON loader and the projection it feeds.

    .venv/bin/python tests/fuzz/fuzz_calibration.py -atheris_runs=20000 -rss_limit_mb=4096 \\
        -timeout=30 -artifact_prefix=/tmp/fuzz-cal- /tmp/fuzz-cal-corpus tests/corpus/calibration

Contract: tests/fuzz/targets.py (check_calibration_bytes).
"""

import sys

import atheris

with atheris.instrument_imports(include=["pkstrace"]):  # not pandas/pyarrow: slow, not ours
    import pkstrace.analysis.projection  # noqa: F401

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from targets import check_calibration_bytes  # noqa: E402


def one_input(data: bytes) -> None:
    check_calibration_bytes(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
