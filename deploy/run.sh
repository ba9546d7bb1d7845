#!/usr/bin/env bash
# The README's run command: installs what is missing, builds (Release, into
# build/), and runs the system on this machine in the foreground with its
# embedded defaults. Ctrl-C or SIGTERM stops everything it started.
#
# What runs grows with the project: every service whose binary the build
# produced is started on its default port (DESIGN.md), with its peers'
# addresses; logs (JSON lines) go to .data/logs/<service>.log.
#
# Environment: BUILD_DIR (default <repo>/build), DATA_DIR (default
# <repo>/.data), and every variable the services read (LOG_LEVEL, ...).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="${BUILD_DIR:-$root/build}"
data="${DATA_DIR:-$root/.data}"
mkdir -p "$data/logs"

bash "$root/deploy/install-deps.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j2

pids=()
stop_all() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    echo "stopping ${#pids[@]} process(es)..."
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  echo "stopped"
}
trap stop_all INT TERM EXIT

# start NAME ADDR [ARGS...]: starts a built service and waits for its gRPC
# health (or, with no Python grpcio, for its port to open).
start() {
  local name=$1 addr=$2
  shift 2
  local bin="$build/$name/$name"
  [ -x "$bin" ] || return 0
  "$bin" --listen "$addr" "$@" 2>>"$data/logs/$name.log" &
  pids+=($!)
  local port=${addr##*:}
  for _ in $(seq 1 100); do
    if /usr/bin/python3 - "$port" <<'PY' 2>/dev/null; then
import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.2).close()
PY
      echo "$name listening on $addr (log: $data/logs/$name.log)"
      return 0
    fi
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "$name exited; see $data/logs/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "$name did not start within 10 s; see $data/logs/$name.log" >&2
  exit 1
}

start router-svc "${ROUTER_ADDR:-127.0.0.1:50051}"

echo "running; press Ctrl-C to stop"
wait -n "${pids[@]}" || true
echo "a service exited; see $data/logs" >&2
