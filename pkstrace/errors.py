"""Errors that end a command with a one-line message (exit status 2), never a traceback."""


class PkstraceError(Exception):
    """Base class: ``str(e)`` is the one-line message shown to the user."""

    exit_status = 2


class InputError(PkstraceError):
    """The input (trace, text capture, calibration file, option) is unusable."""


class PrivilegeError(PkstraceError):
    """The operation needs privileges the caller lacks."""


class KernelFeatureError(PkstraceError):
    """The running kernel lacks a feature the operation needs."""
