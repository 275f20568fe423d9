#!/usr/bin/env bash
# Checks the systemd units with systemd-analyze verify and fails on any
# warning. The binary named in ExecStart must exist: build it first (the
# script installs ./stowage to /usr/local/bin/stowage when asked to).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--install-binary" ]; then
  go build -o /usr/local/bin/stowage ./cmd/stowage
fi
rc=0
for unit in systemd/*.service; do
  err=$(systemd-analyze verify --recursive-errors=one --man=no "$unit" 2>&1 >/dev/null) || rc=1
  # systemd-analyze prints noise about the absent D-Bus when systemd is not PID 1.
  err=$(printf '%s\n' "$err" | grep -v -e 'System has not been booted with systemd' -e 'Failed to connect to bus' -e '^$' || true)
  if [ -n "$err" ]; then
    printf 'systemd-analyze verify %s:\n%s\n' "$unit" "$err" >&2
    rc=1
  fi
done
[ $rc -eq 0 ] && echo "systemd units verify clean"
exit $rc
