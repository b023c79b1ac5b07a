"""Analysis: events table -> Findings. Reads the trace's columns and metadata only.

Entry point: :func:`analyse` (implemented in ``pipeline.py``). Each family of
findings lives in its own module and is a pure function of the events table.
"""

from __future__ import annotations

from pkstrace.analysis.findings import Findings

__all__ = ["Findings", "analyse"]


def analyse(*args, **kwargs) -> Findings:  # noqa: D103 - thin re-export, see pipeline.analyse
    from pkstrace.analysis.pipeline import analyse as _analyse

    return _analyse(*args, **kwargs)
