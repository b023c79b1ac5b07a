#!/usr/bin/env bash
# The main job: a short live recording on this host while real cross-CPU calls
# happen, then the analysis (the same summary `pkstrace replay` prints).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${PKSTRACE_DEMO_OUT:-demo.pkstrace}
run() { echo "+ $*" >&2; "$@"; }
if [ "$(id -u)" = 0 ]; then
  run .venv/bin/pkstrace record -d 10 -o "$out" --force -- \
      .venv/bin/python -m pkstrace.workload --calls 2000 --target-cpu 1
else
  run sudo .venv/bin/pkstrace record -d 10 -o "$out" --force -- \
      .venv/bin/python -m pkstrace.workload --calls 2000 --target-cpu 1
fi
run .venv/bin/pkstrace report "$out" -o demo.html --force
echo "trace: $out   dashboard: demo.html"
