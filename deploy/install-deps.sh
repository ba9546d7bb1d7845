#!/usr/bin/env bash
# Installs every build, run and test dependency of the project on Debian 12:
# the Debian packages below (apt-get, as root), the Node test tools of
# tests/package.json (npm, into tests/node_modules) and the web page's
# third-party code of gateway/web/package.json (marked, DOMPurify: npm, into
# gateway/web/node_modules, which the gateway serves as /app/vendor/).
#
# Idempotent and quiet: when everything is there it prints one line,
# "all dependencies present", and changes nothing. `apt-get update` runs only
# when a package is missing; npm runs in a folder only when its node_modules
# is missing or its package.json / package-lock.json changed since the last
# install.
#
# Usage: deploy/install-deps.sh           install what is missing
#        deploy/install-deps.sh --check   exit 1 (and say what) if anything is missing
#        deploy/install-deps.sh --list    print the Debian package list, one a line
#        deploy/install-deps.sh --web     install the web page's npm packages only
#                                         (the Docker build: npm is there already)
#
# Python: always Debian's /usr/bin/python3 (its python3-grpcio etc. below);
# a pyenv python3 earlier on PATH does not have them.
set -euo pipefail

# The one list of Debian packages (a test compares it with the Dockerfile's).
PACKAGES=(
  build-essential
  cmake
  pkg-config
  git
  libgrpc-dev
  libssl-dev
  libprotobuf-c-dev
  libprotobuf-dev
  protobuf-c-compiler
  protobuf-compiler
  libwebsockets-dev
  libwebsockets-evlib-ev
  libev-dev
  libcurl4-openssl-dev
  libpq-dev
  libjson-c-dev
  libcjose-dev
  libmicrohttpd-dev
  libunistring-dev
  libcmocka-dev
  postgresql
  postgresql-contrib
  python3
  python3-grpcio
  python3-grpc-tools
  python3-protobuf
  python3-pytest
  python3-psycopg2
  python3-prometheus-client
  python3-websockets
  python3-yaml
  python3-jwt
  python3-cryptography
  nodejs
  npm
  chromium
  clang-format
  kubernetes-client
  prometheus
)

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tests_dir="$root/tests"
web_dir="$root/gateway/web"

mode=install
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  --list) printf '%s\n' "${PACKAGES[@]}"; exit 0 ;;
  --web) mode=web ;;
  -h | --help) sed -n '2,21s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) echo "install-deps.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac

# Prints the listed packages that are not installed. A package counts as
# installed when dpkg has it, or when an installed package Provides it (for
# example NodeSource's nodejs provides npm; installing Debian's npm beside it
# would fight over /usr/bin/npm).
missing_packages() {
  dpkg-query -W -f='${db:Status-Abbrev}|${Package}|${Provides}\n' 2>/dev/null |
    awk -F'|' -v want="${PACKAGES[*]}" '
      $1 ~ /^ii/ {
        have[$2] = 1
        n = split($3, prov, /, */)
        for (i = 1; i <= n; i++) { sub(/[ (].*/, "", prov[i]); if (prov[i] != "") have[prov[i]] = 1 }
      }
      END { n = split(want, w, " "); for (i = 1; i <= n; i++) if (!(w[i] in have)) print w[i] }' |
    # Any kubectl will do for `kubectl kustomize`; a newer one from another
    # package (e.g. Google's `kubectl`) owns /usr/bin/kubectl, and installing
    # kubernetes-client beside it would fail on that file.
    if command -v kubectl >/dev/null 2>&1; then grep -vx kubernetes-client || true; else cat; fi
}

# The content a folder's npm stamp records: its manifests and the Node version.
npm_fingerprint() {
  local dir=$1
  {
    node --version 2>/dev/null || true
    cat "$dir/package.json"
    [ ! -f "$dir/package-lock.json" ] || cat "$dir/package-lock.json"
  } | sha256sum | cut -d' ' -f1
}

npm_needed() {
  local dir=$1
  [ -f "$dir/package.json" ] || return 1
  [ -d "$dir/node_modules" ] || return 0
  [ -f "$dir/node_modules/.install-deps.stamp" ] || return 0
  [ "$(cat "$dir/node_modules/.install-deps.stamp")" != "$(npm_fingerprint "$dir")" ]
}

# npm ci (the lock file's exact versions) in a folder; extra arguments go to
# npm.
npm_install() {
  local dir=$1
  shift
  (cd "$dir" && quietly npm ci --no-audit --no-fund "$@")
  npm_fingerprint "$dir" >"$dir/node_modules/.install-deps.stamp"
}

# Runs a command with its output kept aside, shown only when it fails.
quietly() {
  local out rc=0
  out=$(mktemp)
  "$@" >"$out" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "install-deps.sh: '$*' failed (exit $rc):" >&2
    tail -n 40 "$out" >&2
  fi
  rm -f "$out"
  return "$rc"
}

# The Docker build stage has its Debian packages already: only the web
# page's npm packages (no optional ones: @types/* are for editors).
if [ "$mode" = web ]; then
  npm_install "$web_dir" --omit=dev --omit=optional
  exit 0
fi

mapfile -t missing < <(missing_packages)
did_something=0

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$mode" = check ]; then
    echo "missing Debian packages: ${missing[*]}"
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: missing Debian packages: ${missing[*]}" >&2
    echo "run as root:  apt-get update && apt-get install -y ${missing[*]}" >&2
    echo "(or run this script as root: sudo $root/deploy/install-deps.sh)" >&2
    exit 1
  fi
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  quietly apt-get update -q
  quietly apt-get install -y -q "${missing[@]}"
  mapfile -t still < <(missing_packages)
  if [ "${#still[@]}" -gt 0 ]; then
    echo "install-deps.sh: still missing after apt-get install: ${still[*]}" >&2
    exit 1
  fi
  did_something=1
fi

if npm_needed "$tests_dir"; then
  if [ "$mode" = check ]; then
    echo "Node test tools not installed (or out of date): run deploy/install-deps.sh"
    exit 1
  fi
  echo "installing Node test tools into tests/node_modules"
  npm_install "$tests_dir" --include=dev
  did_something=1
fi

if npm_needed "$web_dir"; then
  if [ "$mode" = check ]; then
    echo "the web page's npm packages not installed (or out of date): run deploy/install-deps.sh"
    exit 1
  fi
  echo "installing the web page's npm packages into gateway/web/node_modules"
  npm_install "$web_dir" --omit=dev --omit=optional
  did_something=1
fi

if [ "$did_something" -eq 0 ]; then
  echo "all dependencies present"
fi
