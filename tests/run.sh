#!/usr/bin/env bash
# The project's test command (see README): installs what is missing
# (deploy/install-deps.sh), configures and builds into build-test/, and runs
# every test with ctest. Exits with ctest's status. Works from any directory.
#
# build-test/ is kept apart from a developer's build/ so that the sanitizer
# and -Werror settings below never force a rebuild of the other tree.
# It always builds with -DCONVO_SANITIZE=ON, and with CI=true also with
# -DCONVO_WERROR=ON; CONVO_SANITIZE / CONVO_WERROR (ON|OFF) override.
#
# Environment: BUILD_DIR (default <repo>/build-test), CTEST_TIMEOUT (seconds
# per test that sets no TIMEOUT of its own, default 300), CTEST_PARALLEL_LEVEL
# (ctest's own), CTEST_ARGS (extra ctest arguments, e.g. "-R interop").
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="${BUILD_DIR:-$root/build-test}"

# The tests always run under AddressSanitizer + UBSan; warnings fail the build
# in CI only, so a newer compiler's new warning does not block a developer.
if [ "${CI:-}" = true ]; then werror_default=ON; else werror_default=OFF; fi
sanitize="${CONVO_SANITIZE:-ON}"
werror="${CONVO_WERROR:-$werror_default}"

bash "$root/deploy/install-deps.sh"

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCONVO_SANITIZE="$sanitize" -DCONVO_WERROR="$werror"
cmake --build "$build" -j2

# Sanitizer reports: stack traces for UBSan; ASan/LSan defaults otherwise.
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"

# shellcheck disable=SC2086 # CTEST_ARGS is a word list on purpose
exec ctest --test-dir "$build" --output-on-failure --no-tests=error \
  --timeout "${CTEST_TIMEOUT:-300}" ${CTEST_ARGS:-}
