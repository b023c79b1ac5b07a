"""The `pkstrace` command: one subcommand per module under pkstrace/commands/.

Each command module provides ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``, and imports nothing heavy at module level, so that
``pkstrace -h`` and argument errors stay instant.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

from pkstrace import __version__
from pkstrace.errors import PkstraceError

# (subcommand, module under pkstrace.commands) in the order -h lists them:
# the data flow, left to right.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("record", "record"),
    ("emulate", "emulate"),
    ("import", "import_"),
    ("replay", "replay"),
    ("report", "report"),
    ("export", "export"),
    ("bench", "bench"),
    ("doctor", "doctor"),
    ("schema", "schema_cmd"),
)

EPILOG = """\
examples:
  sudo pkstrace record -d 10 -o host.pkstrace       # record 10 s on this host
  sudo pkstrace record -- ./my-workload             # record while a command runs
  pkstrace replay host.pkstrace                     # analyse a recorded trace
  pkstrace replay trace.txt --isolated 6-7 --json   # analyse an ftrace text capture
  pkstrace emulate --cpus 8 --isolated 6-7 --scenario v3 -o v3.pkstrace
  pkstrace report v3.pkstrace lazy.pkstrace -o compare.html
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pkstrace",
        description="Trace per-CPU MSR state (PKRS) and the cross-CPU calls that update it; "
        "analyse redundant writes, IPI latency, global-update stalls, isolation "
        "violations, preempt-count drift and lost updates.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pkstrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS:
        try:
            mod = importlib.import_module(f"pkstrace.commands.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"pkstrace.commands.{module_name}":
                continue  # command not part of this build
            raise
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            epilog=getattr(mod, "EXAMPLES", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    old = signal.getsignal(signal.SIGINT)
    ours = old is signal.default_int_handler
    if ours:
        try:
            signal.signal(signal.SIGINT, _on_sigint)
        except ValueError:  # not the main thread
            ours = False
    try:
        return _main(argv)
    finally:
        if ours:
            signal.signal(signal.SIGINT, old)


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while the command modules load: no traceback
        return 128 + signal.SIGINT
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except PkstraceError as e:
        print(f"pkstrace {args.command}: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # `pkstrace replay x | head`: not an error worth a traceback.
        sys.stderr.close()
        return 0
    except Exception:
        # A Ctrl-C inside a C extension's import (numpy, pyarrow) surfaces as that
        # import's ImportError, not as KeyboardInterrupt: still just an interrupt.
        if _sigint_seen:
            return 128 + signal.SIGINT
        raise


_sigint_seen = False


def sigint_seen() -> bool:
    """True once Ctrl-C reached this process (even if an import swallowed it)."""
    return _sigint_seen


def _on_sigint(signum: int, frame: object) -> None:
    """Python's default Ctrl-C behaviour, remembering that it happened."""
    global _sigint_seen
    _sigint_seen = True
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
