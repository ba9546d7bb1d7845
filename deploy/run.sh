#!/usr/bin/env bash
# The README's run command: installs what is missing, builds (Release, into
# build/), and runs the whole system on this machine in the foreground:
#
#   1. a throwaway PostgreSQL, its data in .data/pg (created by initdb on the
#      first start, reused on the next ones), on 127.0.0.1:5433;
#   2. store-svc (applies the schema migrations on start);
#   3. the offline model (a deterministic OpenAI-compatible stand-in) -- not
#      when OPENAI_API_KEY or OPENAI_BASE_URL name a real endpoint;
#   4. llm-svc, router-svc, summary-svc and the gateway;
#
# waits for every health check (gRPC grpc.health.v1.Health, the gateway's
# GET /api/health), prints the web page's URL and runs until Ctrl-C or
# SIGTERM, which stop everything it started: the gateway first (it flushes its
# sessions' events to store-svc), then the other services, PostgreSQL last.
# A service whose binary is not built is skipped, with a line saying so.
# Works as root (PostgreSQL then runs as the `postgres` system user: initdb
# and postgres refuse root) or as any user. Exit status: 0 after a clean stop;
# 1 when something failed to start, exited on its own or had to be killed.
#
# Logs: one file per process in .data/logs/ (JSON lines; the previous run's
# file is kept as <name>.log.1).
#
# Environment (all optional):
#   DATA_DIR        where PostgreSQL's data and the logs go (default <repo>/.data)
#   BUILD_DIR       the build tree (default <repo>/build)
#   RUN_SKIP_INSTALL=1, RUN_SKIP_BUILD=1   skip install-deps.sh / the build
#   HOST, PORT      the gateway's address (default 127.0.0.1:8000; another
#                   machine reaching --auth dev could sign in as anyone, so a
#                   public HOST also needs DEV_ALLOW_REMOTE=true)
#   AUTH_MODE       the gateway's --auth (default dev: the web page signs in
#                   by user name, POST /api/dev/token gives tokens)
#   BIND_HOST       address of the internal services (default 127.0.0.1)
#   PG_PORT, STORE_PORT, LLM_PORT, ROUTER_PORT, SUMMARY_PORT, MODEL_PORT
#                   ports (defaults 5433, 50053, 50052, 50051, 50054, 8089); the
#                   gateway and each service serve /metrics on their port + 1000
#   METRICS_LISTEN=off   no metrics at all (nothing recorded, no metrics port)
#   DATABASE_URL    use this PostgreSQL instead of starting one
#   OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MODEL   a real model endpoint
#   HEALTH_TIMEOUT  seconds each process may take to become healthy (30)
#   STOP_TIMEOUT    seconds each stop stage may take before SIGKILL (20)
#   and every variable the services read (LOG_LEVEL, ROUTER_CONFIG, ...).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="${BUILD_DIR:-$root/build}"
data="${DATA_DIR:-$root/.data}"
py=/usr/bin/python3
health="$root/deploy/healthcheck.py"

bind="${BIND_HOST:-127.0.0.1}"
gw_host="${HOST:-127.0.0.1}"
gw_port="${PORT:-8000}"
pg_port="${PG_PORT:-5433}"
store_port="${STORE_PORT:-50053}"
llm_port="${LLM_PORT:-50052}"
router_port="${ROUTER_PORT:-50051}"
summary_port="${SUMMARY_PORT:-50054}"
model_port="${MODEL_PORT:-8089}"
health_timeout="${HEALTH_TIMEOUT:-30}"
stop_timeout="${STOP_TIMEOUT:-20}"

say() { echo "run.sh: $*"; }
die() { echo "run.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------- process table
declare -A pid_of=()   # name -> pid of what we started and have not reaped
failed=0
stopping=0
await_pid=""

# exited PID: true when the process is gone or a zombie (our child, unreaped).
exited() {
  local state
  state=$(cut -d')' -f2 "/proc/$1/stat" 2>/dev/null | awk '{print $1}') || return 0
  [ -z "$state" ] || [ "$state" = Z ] || [ "$state" = X ]
}

# stop_stage SIGNAL NAME...: signals the named processes, waits for them
# (STOP_TIMEOUT), SIGKILLs any still there; reports exit statuses.
stop_stage() {
  local sig=$1 name pid rc
  shift
  local names=()
  for name in "$@"; do
    [ -n "${pid_of[$name]:-}" ] || continue
    names+=("$name")
    kill -s "$sig" "${pid_of[$name]}" 2>/dev/null || true
  done
  [ ${#names[@]} -gt 0 ] || return 0
  local deadline=$((SECONDS + stop_timeout)) waiting
  while :; do
    waiting=0
    for name in "${names[@]}"; do exited "${pid_of[$name]}" || waiting=1; done
    [ "$waiting" -eq 1 ] && [ "$SECONDS" -lt "$deadline" ] || break
    sleep 0.1
  done
  for name in "${names[@]}"; do
    pid=${pid_of[$name]}
    if ! exited "$pid"; then
      echo "run.sh: $name did not stop within ${stop_timeout} s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      failed=1
    fi
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
    unset "pid_of[$name]"
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 143 ]; then
      echo "run.sh: $name exited with status $rc (log: $(logfile "$name"))" >&2
      failed=1
    fi
  done
  say "stopped ${names[*]}"
}

stop_all() {
  [ "$stopping" -eq 0 ] || return 0
  stopping=1
  trap '' INT TERM
  if [ -n "$await_pid" ]; then kill "$await_pid" 2>/dev/null || true; wait "$await_pid" 2>/dev/null || true; fi
  if [ ${#pid_of[@]} -gt 0 ]; then
    say "stopping..."
    stop_stage TERM gateway
    stop_stage TERM summary-svc llm-svc router-svc
    stop_stage TERM offline-model store-svc
    stop_stage INT postgres # fast shutdown: clients gone, checkpoint, exit
  fi
}

on_signal() {
  stop_all
  if [ "$failed" -eq 0 ]; then say "all stopped"; exit 0; fi
  exit 1
}
trap on_signal INT TERM
trap 'stop_all' EXIT

logfile() { echo "$data/logs/$1.log"; }

# launch NAME [--as USER] CMD...: starts CMD in the background, in its own
# session (Ctrl-C in the terminal reaches only this script, which then stops
# things in order), SIGKILLed by the kernel if this script dies without
# cleaning up; stderr and stdout to the process's log file.
launch() {
  local name=$1 log
  shift
  local as=()
  if [ "${1:-}" = --as ]; then
    as=("--reuid=$2" "--regid=$2" --init-groups)
    shift 2
  fi
  log=$(logfile "$name")
  [ ! -f "$log" ] || mv -f "$log" "$log.1"
  setsid setpriv "${as[@]}" --pdeathsig=KILL -- "$@" </dev/null >>"$log" 2>&1 &
  pid_of[$name]=$!
}

# await NAME KIND TARGET: waits (in the background, so that a signal is acted
# on at once) until healthcheck.py says NAME is healthy.
await() {
  local name=$1 kind=$2 target=$3 out rc=0
  out=$(mktemp)
  "$py" "$health" --timeout "$health_timeout" --pid "${pid_of[$name]}" "$kind" "$target" >"$out" 2>&1 &
  await_pid=$!
  wait "$await_pid" || rc=$?
  await_pid=""
  if [ "$rc" -ne 0 ]; then
    echo "run.sh: $name did not become healthy ($kind $target): $(tail -n 1 "$out")" >&2
    echo "run.sh: last lines of $(logfile "$name"):" >&2
    tail -n 15 "$(logfile "$name")" >&2 || true
    rm -f "$out"
    failed=1
    exit 1
  fi
  HEALTH_BODY=$(cat "$out")
  rm -f "$out"
}

port_free() {
  ! "$py" - "$1" "$2" <<'PY' 2>/dev/null
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.3).close()
PY
}

need_port() { # need_port WHAT HOST PORT VAR
  local h=$2
  [ "$h" != 0.0.0.0 ] || h=127.0.0.1
  port_free "$h" "$3" || die "port $3 ($1) is already in use: stop what uses it, or set $4"
  # Its /metrics port (--metrics-listen auto: the port + 1000), unless off.
  if [ "$1" != PostgreSQL ] && [ "$1" != offline-model ] && [ "${METRICS_LISTEN:-}" != off ]; then
    port_free "$h" $(($3 + 1000)) ||
      die "port $(($3 + 1000)) ($1's /metrics: its port + 1000) is already in use: set $4, or METRICS_LISTEN=off"
  fi
}

binary() { # binary NAME -> path of a built binary, or "" (with a line saying so)
  local p="$build/$1/$1"
  [ "$1" != offline-model ] || p="$build/llm-svc/offline-model"
  if [ -x "$p" ]; then echo "$p"; else echo ""; fi
}

# ------------------------------------------------------------ install, build
if [ "${RUN_SKIP_INSTALL:-0}" != 1 ]; then
  bash "$root/deploy/install-deps.sh"
fi
if [ "${RUN_SKIP_BUILD:-0}" != 1 ]; then
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCONVO_SANITIZE=OFF >/dev/null
  cmake --build "$build" -j"${BUILD_JOBS:-2}"
fi
[ -x "$py" ] || die "$py not found: run deploy/install-deps.sh"
mkdir -p "$data/logs"

declare -A bin=()
for name in store-svc offline-model llm-svc router-svc summary-svc gateway; do
  bin[$name]=$(binary "$name")
  if [ -z "${bin[$name]}" ] && [ "$name" != offline-model ]; then
    say "skipping $name: not built yet ($build/$name/$name does not exist)"
  fi
done

store_addr="$bind:$store_port"
llm_addr="$bind:$llm_port"
router_addr="$bind:$router_port"
summary_addr="$bind:$summary_port"

# ------------------------------------------------------------------- PostgreSQL
if [ -n "${DATABASE_URL:-}" ]; then
  say "using the PostgreSQL of DATABASE_URL (none started)"
  db_url=$DATABASE_URL
elif [ -n "${bin[store-svc]}" ]; then
  pg_bindir=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
  [ -x "$pg_bindir/postgres" ] && [ -x "$pg_bindir/initdb" ] ||
    die "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin): run deploy/install-deps.sh"
  need_port PostgreSQL 127.0.0.1 "$pg_port" PG_PORT
  pgdata="$data/pg"
  pgsock="$data/pg-run"
  mkdir -p "$pgsock"
  as=()
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the postgres system user (package postgresql)"
    as=(--as postgres)
    mkdir -p "$pgdata"
    chown postgres:postgres "$pgdata" "$pgsock"
    setpriv --reuid=postgres --regid=postgres --init-groups -- test -w "$pgdata" ||
      die "user postgres cannot write $pgdata (a parent folder not open to it?): set DATA_DIR"
  fi
  if [ ! -s "$pgdata/PG_VERSION" ]; then
    if [ -d "$pgdata" ] && [ -n "$(ls -A "$pgdata")" ]; then
      die "$pgdata is not empty but holds no database (an interrupted first start?): remove it"
    fi
    say "creating the database in $pgdata (first start)"
    init=("$pg_bindir/initdb" -D "$pgdata" -U postgres -A trust -E UTF8 --no-locale)
    if [ ${#as[@]} -gt 0 ]; then init=(setpriv --reuid=postgres --regid=postgres --init-groups -- "${init[@]}"); fi
    "${init[@]}" >"$data/logs/initdb.log" 2>&1 ||
      { tail -n 20 "$data/logs/initdb.log" >&2; die "initdb failed (log: $data/logs/initdb.log)"; }
  else
    say "reusing the database in $pgdata"
  fi
  launch postgres "${as[@]}" "$pg_bindir/postgres" -D "$pgdata" -p "$pg_port" -k "$pgsock" \
    -c listen_addresses=127.0.0.1
  deadline=$((SECONDS + health_timeout))
  until "$pg_bindir/pg_isready" -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres; do
    if exited "${pid_of[postgres]}"; then
      tail -n 15 "$(logfile postgres)" >&2
      die "PostgreSQL exited while starting (log: $(logfile postgres))"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "PostgreSQL not ready after ${health_timeout} s (log: $(logfile postgres))"
    sleep 0.1
  done
  db_url="postgresql://postgres@127.0.0.1:$pg_port/postgres"
  say "postgres   ready on 127.0.0.1:$pg_port (data: $pgdata)"
fi

# -------------------------------------------------------------------- services
if [ -n "${bin[store-svc]}" ]; then
  need_port store-svc "$bind" "$store_port" STORE_PORT
  # In the environment, not on the command line (where ps shows it to anyone).
  DATABASE_URL=$db_url DATABASE_URL_FILE='' \
    launch store-svc "${bin[store-svc]}" --listen "$store_addr"
  await store-svc grpc "$store_addr"
  say "store-svc  ready on $store_addr"
fi

if [ -n "${bin[llm-svc]}" ]; then
  if [ -n "${OPENAI_API_KEY:-}" ] || [ -n "${OPENAI_BASE_URL:-}" ]; then
    say "model: ${OPENAI_BASE_URL:-https://api.openai.com/v1} (from OPENAI_API_KEY / OPENAI_BASE_URL)"
  elif [ -n "${bin[offline-model]}" ]; then
    need_port offline-model 127.0.0.1 "$model_port" MODEL_PORT
    launch offline-model "${bin[offline-model]}" --listen "127.0.0.1:$model_port"
    await offline-model tcp "127.0.0.1:$model_port"
    export OPENAI_BASE_URL="http://127.0.0.1:$model_port/v1"
    say "model: the offline model on 127.0.0.1:$model_port (no OPENAI_API_KEY / OPENAI_BASE_URL set)"
  else
    say "model: no OPENAI_API_KEY / OPENAI_BASE_URL and no offline model built: answers will fail"
  fi
  need_port llm-svc "$bind" "$llm_port" LLM_PORT
  launch llm-svc "${bin[llm-svc]}" --listen "$llm_addr" --store "$store_addr"
  await llm-svc grpc "$llm_addr"
  say "llm-svc    ready on $llm_addr"
fi

if [ -n "${bin[router-svc]}" ]; then
  need_port router-svc "$bind" "$router_port" ROUTER_PORT
  launch router-svc "${bin[router-svc]}" --listen "$router_addr"
  await router-svc grpc "$router_addr"
  say "router-svc ready on $router_addr"
fi

if [ -n "${bin[summary-svc]}" ]; then
  need_port summary-svc "$bind" "$summary_port" SUMMARY_PORT
  launch summary-svc "${bin[summary-svc]}" --listen "$summary_addr" --store "$store_addr" --llm "$llm_addr"
  await summary-svc grpc "$summary_addr"
  say "summary-svc ready on $summary_addr"
fi

if [ -z "${bin[gateway]}" ]; then
  say "nothing to serve the web page: the gateway is not built"
else
  need_port gateway "$gw_host" "$gw_port" PORT
  launch gateway "${bin[gateway]}" --listen "$gw_host:$gw_port" --router "$router_addr" \
    --llm "$llm_addr" --store "$store_addr" --summary "$summary_addr" --auth "${AUTH_MODE:-dev}"
  local_host=$gw_host
  [ "$local_host" != 0.0.0.0 ] || local_host=127.0.0.1
  await gateway http "http://$local_host:$gw_port/api/health"
  # 200 with "status":"degraded" when a service is missing: name them.
  degraded=$("$py" -c 'import json, sys
h = json.loads(sys.argv[1])
bad = [k + "=" + str(v.get("status")) for k, v in h.get("services", {}).items() if v.get("status") != "SERVING"]
print(" ".join(bad))' "$HEALTH_BODY" 2>/dev/null || true)
  say "gateway    ready on $gw_host:$gw_port${degraded:+ (degraded: $degraded)}"
  echo
  echo "convo is running. Web page:  http://$local_host:$gw_port/app/"
  if [ "$gw_host" = 0.0.0.0 ]; then
    lan=$(hostname -I 2>/dev/null | awk '{print $1}')
    [ -z "$lan" ] || echo "  (from other machines:  http://$lan:$gw_port/app/)"
  fi
  echo "  WebSocket  ws://$local_host:$gw_port/ws/session/{session_id}?access_token={token}"
  echo "  a token    curl -s -X POST -d '{\"user_id\":\"alice\"}' http://$local_host:$gw_port/api/dev/token"
  echo "  health     http://$local_host:$gw_port/api/health"
  [ "${METRICS_LISTEN:-}" = off ] ||
    echo "  metrics    http://$local_host:$((gw_port + 1000))/metrics (each service: its port + 1000)"
fi
echo "  logs       $data/logs/"
echo "Press Ctrl-C to stop."

# ---------------------------------------------------------------------- run
[ ${#pid_of[@]} -gt 0 ] || { say "nothing is built yet: nothing to run"; exit 1; }
while :; do
  rc=0
  wait -n "${pid_of[@]}" || rc=$?
  for name in "${!pid_of[@]}"; do
    if exited "${pid_of[$name]}"; then
      wait "${pid_of[$name]}" 2>/dev/null || true
      unset "pid_of[$name]"
      echo "run.sh: $name exited on its own; see $(logfile "$name")" >&2
      failed=1
    fi
  done
  if [ "$failed" -eq 1 ]; then
    stop_all
    exit 1
  fi
done
