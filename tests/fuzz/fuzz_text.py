"""atheris harness: the ftrace-text / trace-cmd / perf-script importers.

    .venv/bin/python tests/fuzz/fuzz_text.py -atheris_runs=100000 -rss_limit_mb=4096 \\
        -timeout=30 -artifact_prefix=/tmp/fuzz-text- /tmp/fuzz-text-corpus tests/fixtures

Seeds: the real captures in tests/fixtures (and tests/corpus/text). A crash is any
input for which the reader raises something other than a one-line PkstraceError or
returns an invalid table (tests/fuzz/targets.py: check_text_bytes).
"""

import sys

import atheris

with atheris.instrument_imports(include=["pkstrace"]):  # not pandas/pyarrow: slow, not ours
    import pkstrace.importers  # noqa: F401
    import pkstrace.importers.common  # noqa: F401
    import pkstrace.importers.ftrace_text  # noqa: F401
    import pkstrace.importers.landmarks  # noqa: F401
    import pkstrace.importers.perf_script  # noqa: F401

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from targets import check_text_bytes  # noqa: E402


def one_input(data: bytes) -> None:
    check_text_bytes(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
