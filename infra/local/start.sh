#!/usr/bin/env bash
# Start a local Ray head and an MLflow tracking server, both on 127.0.0.1, for development and
# the integration tests. Idempotent: a component that is already running is left alone.
#
# Each server runs in its own process group, recorded in $VISTR_LOCAL_DIR/{ray,mlflow}.pgid, so
# infra/local/stop.sh can end exactly what this script started (never `ray stop`, which would
# also kill every other Ray instance on the machine). The exports to use them are written to
# $VISTR_LOCAL_DIR/env.sh and printed:   eval "$(infra/local/start.sh)"   or   source .../env.sh
#
# Settings (environment, all optional):
#   VISTR_LOCAL_DIR           state: pgid files, logs, env.sh, sqlite store, artifacts (runs/local)
#   VISTR_VENV                the virtualenv whose ray/mlflow/python run the servers (.venv)
#   VISTR_RAY_PORT            GCS port (6379)       VISTR_RAY_DASHBOARD_PORT  dashboard / jobs API (8265)
#   VISTR_RAY_NUM_CPUS        CPUs Ray may use (2)  VISTR_MLFLOW_PORT         MLflow port (5000)
#   VISTR_RAY_AUTH_MODE       token (default) or disabled (an isolated throwaway cluster only)
#   VISTR_START_TIMEOUT       seconds to wait for each server to answer (180)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${VISTR_VENV:-$ROOT/.venv}/bin"
STATE="${VISTR_LOCAL_DIR:-$ROOT/runs/local}"
RAY_PORT="${VISTR_RAY_PORT:-6379}"
DASHBOARD_PORT="${VISTR_RAY_DASHBOARD_PORT:-8265}"
NUM_CPUS="${VISTR_RAY_NUM_CPUS:-2}"
MLFLOW_PORT="${VISTR_MLFLOW_PORT:-5000}"
AUTH_MODE="${VISTR_RAY_AUTH_MODE:-token}"
TIMEOUT="${VISTR_START_TIMEOUT:-180}"

for tool in ray mlflow python; do
  [[ -x "$BIN/$tool" ]] || { echo "start.sh: $BIN/$tool not found: run 'make venv' or set VISTR_VENV" >&2; exit 1; }
done
[[ "$AUTH_MODE" == token || "$AUTH_MODE" == disabled ]] \
  || { echo "start.sh: VISTR_RAY_AUTH_MODE must be 'token' or 'disabled', got '$AUTH_MODE'" >&2; exit 1; }
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"

# A recorded group still running the named server (guards against a recycled pgid).
group_alive() {
  local name=$1 pgid
  [[ -s "$STATE/$name.pgid" ]] || return 1
  pgid=$(cat "$STATE/$name.pgid")
  kill -0 -- "-$pgid" 2>/dev/null && ps -o args= -p "$pgid" | grep -q "$name"
}

free_port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Polls URL (with optional Bearer token file) until HTTP 200; fails early if the group died.
wait_http() {
  local name=$1 url=$2 token_file=${3:-}
  "$BIN/python" - "$name" "$url" "$token_file" "$TIMEOUT" "$STATE/$name.pgid" <<'PY'
import os, sys, time, urllib.request
name, url, token_file, timeout, pgid_file = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
headers = {"Authorization": "Bearer " + open(token_file).read().strip()} if token_file else {}
pgid = int(open(pgid_file).read())
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        sys.exit(f"start.sh: {name} exited during start-up")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(f"start.sh: {name} did not answer {url} within {timeout:.0f} s")
PY
}

start_ray() {
  local token_file="" client_port agent_port autoscaler_metrics dashboard_metrics temp_dir
  if [[ "$AUTH_MODE" == token ]]; then
    # A token of this cluster's own, not ~/.ray/auth_token: clients point RAY_AUTH_TOKEN_PATH at it.
    token_file="$STATE/ray_auth_token"
    [[ -s "$token_file" ]] || (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_hex(32))' > "$token_file")
  fi
  # Ports Ray would otherwise take at fixed defaults (10001, 52365, 44217, 44227) and share with
  # any other Ray on this machine: pick free ones.
  client_port=$(free_port); agent_port=$(free_port); autoscaler_metrics=$(free_port); dashboard_metrics=$(free_port)
  # Ray's session dir holds unix sockets (path limit ~107 bytes): keep it short, one per cluster.
  temp_dir="${TMPDIR:-/tmp}/vistr-ray-$(id -u)-$RAY_PORT"
  echo "$temp_dir" > "$STATE/ray.tempdir"
  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: in Ray 2.60 `--node-ip-address 127.0.0.1` alone is
  # rewritten to the machine's own address (services.resolve_ip_for_localhost) and the GCS then
  # listens on every interface; with it, Ray keeps a single-node cluster on loopback. Clients need
  # it too (env.sh), or they resolve 127.0.0.1 to that address. No drain on SIGTERM: nothing
  # to hand over on a one-node cluster, and it would hold stop.sh for 30 s.
  env RAY_AUTH_MODE="$AUTH_MODE" ${token_file:+RAY_AUTH_TOKEN_PATH="$token_file"} \
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
    AUTOSCALER_METRIC_PORT="$autoscaler_metrics" DASHBOARD_METRIC_PORT="$dashboard_metrics" \
    setsid "$BIN/ray" start --head --block --disable-usage-stats \
      --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 \
      --port "$RAY_PORT" --dashboard-port "$DASHBOARD_PORT" --num-cpus "$NUM_CPUS" \
      --ray-client-server-port "$client_port" --dashboard-agent-listen-port "$agent_port" \
      --temp-dir "$temp_dir" \
      > "$STATE/ray.log" 2>&1 < /dev/null &
  record_group ray $!
  {
    echo "export RAY_ADDRESS='127.0.0.1:$RAY_PORT'"
    echo "export RAY_API_SERVER_ADDRESS='http://127.0.0.1:$DASHBOARD_PORT'"
    echo "export RAY_AUTH_MODE='$AUTH_MODE'"
    [[ -n "$token_file" ]] && echo "export RAY_AUTH_TOKEN_PATH='$token_file'"
    echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
  } > "$STATE/ray.env"
  echo "$token_file" > "$STATE/ray.token_path"
}

start_mlflow() {
  mkdir -p "$STATE/mlflow-artifacts"
  setsid "$BIN/mlflow" server --backend-store-uri "sqlite:///$STATE/mlflow.db" \
    --artifacts-destination "$STATE/mlflow-artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    > "$STATE/mlflow.log" 2>&1 < /dev/null &
  record_group mlflow $!
  echo "export MLFLOW_TRACKING_URI='http://127.0.0.1:$MLFLOW_PORT'" > "$STATE/mlflow.env"
}

# `setsid CMD &` from a script (no job control) execs CMD as the leader of a new group.
record_group() {
  local name=$1 pid=$2
  [[ "$(ps -o pgid= -p "$pid" | tr -d ' ')" == "$pid" ]] \
    || { echo "start.sh: $name (pid $pid) is not a process-group leader" >&2; exit 1; }
  echo "$pid" > "$STATE/$name.pgid"
}

started=()
group_alive ray || { start_ray; started+=(ray); }
group_alive mlflow || { start_mlflow; started+=(mlflow); }

# Both start in parallel; wait for each one this run started. Failed start-up: stop what we began.
for name in "${started[@]}"; do
  if [[ $name == ray ]]; then
    url="$(sed -n "s/^export RAY_API_SERVER_ADDRESS='\(.*\)'$/\1/p" "$STATE/ray.env")/api/version"
    ok=0; wait_http ray "$url" "$(cat "$STATE/ray.token_path")" || ok=$?
  else
    url="$(sed -n "s/^export MLFLOW_TRACKING_URI='\(.*\)'$/\1/p" "$STATE/mlflow.env")/health"
    ok=0; wait_http mlflow "$url" || ok=$?
  fi
  if [[ $ok -ne 0 ]]; then
    echo "start.sh: last lines of $STATE/$name.log:" >&2; tail -n 20 "$STATE/$name.log" >&2 || true
    VISTR_LOCAL_DIR="$STATE" "$ROOT/infra/local/stop.sh" "${started[@]}" >&2
    exit 1
  fi
done

cat "$STATE/ray.env" "$STATE/mlflow.env" > "$STATE/env.sh"
for name in ray mlflow; do
  if [[ " ${started[*]} " == *" $name "* ]]; then state=started; else state="already running"; fi
  echo "# $name: $state (process group $(cat "$STATE/$name.pgid"), log $STATE/$name.log)" >&2
done
cat "$STATE/env.sh"
