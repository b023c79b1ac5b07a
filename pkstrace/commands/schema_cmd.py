"""`pkstrace schema`: print the JSON Schemas of the replay document and of a trace row."""

from __future__ import annotations

import argparse
import json

HELP = "print the JSON Schema of `replay --json` and of the trace's columns"
DESCRIPTION = """\
Print JSON Schemas (draft 2020-12), generated from the code that produces the
data: the document `pkstrace replay --json` prints, and one row of a trace's
events table (the columns of a .pkstrace Parquet file).
"""
EXAMPLES = """\
examples:
  pkstrace schema                     # {"replay": {...}, "trace_columns": {...}}
  pkstrace schema --only replay       # just the replay document's schema
  pkstrace schema --only trace        # just the trace row's schema
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", choices=("replay", "trace"),
                   help="print one schema instead of both")


def run(args: argparse.Namespace) -> int:
    from pkstrace.reports.json import replay_schema, trace_columns_schema

    if args.only == "replay":
        doc = replay_schema()
    elif args.only == "trace":
        doc = trace_columns_schema()
    else:
        doc = {"replay": replay_schema(), "trace_columns": trace_columns_schema()}
    print(json.dumps(doc, indent=1))
    return 0
