"""pkstrace: trace and analyse per-CPU MSR state and the cross-CPU calls that update it."""

__version__ = "0.1.0"
