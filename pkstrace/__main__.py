import signal

try:
    from pkstrace.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: no traceback
    raise SystemExit(128 + signal.SIGINT) from None

raise SystemExit(main())
