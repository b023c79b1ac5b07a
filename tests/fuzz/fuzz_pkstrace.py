"""atheris harness: the .pkstrace reader (read_meta + read_trace).

    .venv/bin/python tests/fuzz/fuzz_pkstrace.py -atheris_runs=20000 -rss_limit_mb=4096 \\
        -timeout=30 -artifact_prefix=/tmp/fuzz-pkstrace- /tmp/fuzz-pkstrace-corpus SEEDS

SEEDS: a directory of small valid .pkstrace files (tests/test_hardening_fuzz.py makes
one from the fixtures) and tests/corpus/pkstrace. Contract: tests/fuzz/targets.py
(check_pkstrace_bytes).
"""

import sys

import atheris

with atheris.instrument_imports(include=["pkstrace"]):  # not pandas/pyarrow: slow, not ours
    import pkstrace.schema  # noqa: F401
    import pkstrace.tracefile  # noqa: F401

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from targets import check_pkstrace_bytes  # noqa: E402


def one_input(data: bytes) -> None:
    check_pkstrace_bytes(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
