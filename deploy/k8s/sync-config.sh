#!/usr/bin/env bash
# Refreshes the Kubernetes copies of the services' config from the source
# tree: router-svc/router.conf -> base/config/router.conf, and
# llm-svc/knowledge/*.{md,txt} -> base/config/knowledge/ (and the file list of
# the llm-knowledge configMapGenerator in base/kustomization.yaml).
# kustomize refuses files outside the kustomization's directory, hence copies;
# tests/deploy/test_k8s.py fails when they differ from the sources.
#
# Usage: deploy/k8s/sync-config.sh [--check]   (--check: exit 1 if out of date)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
base="$here/base"
check=0
[ "${1:-}" = --check ] && check=1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/config/knowledge"
cp "$root/router-svc/router.conf" "$tmp/config/router.conf"
shopt -s nullglob
files=()
for f in "$root"/llm-svc/knowledge/*.md "$root"/llm-svc/knowledge/*.txt; do
  cp "$f" "$tmp/config/knowledge/"
  files+=("$(basename "$f")")
done
[ ${#files[@]} -gt 0 ] || { echo "sync-config.sh: no files in llm-svc/knowledge" >&2; exit 1; }
mapfile -t files < <(printf '%s\n' "${files[@]}" | LC_ALL=C sort)
awk -v list="$(printf '%s\n' "${files[@]}")" '
  /# BEGIN knowledge/ { print; n = split(list, f, "\n"); indent = $0; sub(/#.*/, "", indent)
                        for (i = 1; i <= n; i++) if (f[i] != "") print indent "- config/knowledge/" f[i]
                        skip = 1; next }
  /# END knowledge/ { skip = 0 }
  !skip { print }' "$base/kustomization.yaml" >"$tmp/kustomization.yaml"

if [ "$check" -eq 1 ]; then
  diff -r "$tmp/config" "$base/config" >/dev/null 2>&1 &&
    cmp -s "$tmp/kustomization.yaml" "$base/kustomization.yaml" && exit 0
  echo "deploy/k8s is out of date with router-svc/router.conf or llm-svc/knowledge/: run deploy/k8s/sync-config.sh" >&2
  exit 1
fi
rm -rf "$base/config"
mkdir -p "$base/config"
cp -r "$tmp/config/." "$base/config/"
cp "$tmp/kustomization.yaml" "$base/kustomization.yaml"
echo "deploy/k8s/base/config: router.conf and ${#files[@]} knowledge file(s) refreshed"
