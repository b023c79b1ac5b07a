#!/usr/bin/env bash
# All set-up pkstrace needs on a fresh Debian 12 host of this kind; idempotent.
#   - Debian packages (scripts/apt-packages.txt)
#   - kernel headers where bcc looks for them (this kernel ships none)
#   - a venv that sees Debian's bcc and perf modules, with pkstrace installed
#   - /usr/local/bin/pkstrace, so `sudo pkstrace ...` works from any directory
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

mapfile -t pkgs < <(grep -v '^\s*#' scripts/apt-packages.txt | awk 'NF{print $1}')
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# bcc needs /lib/modules/$(uname -r)/build; this kernel has no headers of its own,
# and tracepoint-only programs compile against Debian's (see ENVIRONMENT.md).
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$hdr" ]; then
    common=${hdr%-amd64}-common
    as_root mkdir -p "$kdir"
    as_root ln -sfn "$hdr" "$kdir/build"
    [ -d "$common" ] && as_root ln -sfn "$common" "$kdir/source"
    echo "setup: bcc will use kernel headers from $hdr"
  fi
fi

# tracefs is not mounted at boot on this kind of host.
if [ ! -e /sys/kernel/tracing/events ] && [ "$(id -u)" = 0 ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi

# Debian's python3 (3.11): bcc and perf exist only for it.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
  as_root ln -sfn "$top/.venv/bin/pkstrace" /usr/local/bin/pkstrace
fi
echo "setup: ok ($(.venv/bin/pkstrace --version))"
