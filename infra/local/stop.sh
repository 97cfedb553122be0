#!/usr/bin/env bash
# Stop what infra/local/start.sh started: the process group of the local Ray head and/or of the
# MLflow server (SIGTERM, then SIGKILL after VISTR_STOP_TIMEOUT s), and remove their pgid files.
# Only those groups are signalled: other Ray or MLflow instances on the machine are left alone.
#
#   infra/local/stop.sh              stop both
#   infra/local/stop.sh mlflow       stop one (ray | mlflow)
#
# VISTR_LOCAL_DIR must name the same directory as for start.sh (default runs/local).
# Logs, the sqlite store and artifacts stay; Ray's session dir (sockets, session logs) is removed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${VISTR_LOCAL_DIR:-$ROOT/runs/local}"
TIMEOUT="${VISTR_STOP_TIMEOUT:-30}"
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(ray mlflow)

stop_group() {
  local name=$1 pgid_file="$STATE/$1.pgid" pgid waited=0
  if [[ ! -s "$pgid_file" ]]; then
    echo "# $name: not running (no $pgid_file)"
    return 0
  fi
  pgid=$(cat "$pgid_file")
  # The leader may be gone while children live on: signal the group if any member remains, but
  # only if the leader (when present) is still the server we started, not a recycled pid.
  if ps -o args= -p "$pgid" > /dev/null 2>&1 && ! ps -o args= -p "$pgid" | grep -q "$name"; then
    echo "# $name: pid $pgid now belongs to another program; not signalling it" >&2
  elif kill -TERM -- "-$pgid" 2>/dev/null; then
    while kill -0 -- "-$pgid" 2>/dev/null && (( waited < TIMEOUT * 10 )); do
      sleep 0.1; waited=$((waited + 1))
    done
    if kill -KILL -- "-$pgid" 2>/dev/null; then
      echo "# $name: process group $pgid killed after ${TIMEOUT} s" >&2
    fi
    echo "# $name: stopped (process group $pgid)"
  else
    echo "# $name: was not running (stale $pgid_file)"
  fi
  rm -f "$pgid_file"
  if [[ $name == ray && -s "$STATE/ray.tempdir" ]]; then
    rm -rf -- "$(cat "$STATE/ray.tempdir")"
    rm -f "$STATE/ray.tempdir"
  fi
}

for name in "${names[@]}"; do
  case $name in
    ray | mlflow) stop_group "$name" ;;
    *) echo "stop.sh: unknown component '$name' (expected ray or mlflow)" >&2; exit 2 ;;
  esac
done
