#!/usr/bin/env bash
# Runs every fuzz target (func Fuzz* in *_test.go) for the given time each.
set -euo pipefail
cd "$(dirname "$0")/.."
t=${1:-10s}
for m in api ztunnel waypoint controller cni-plugin e2e; do
  [ -d "$m" ] || continue
  while IFS= read -r f; do
    dir=$(dirname "$f")
    for fn in $(grep -oE '^func (Fuzz[A-Za-z0-9_]+)' "$f" | awk '{print $2}'); do
      echo "== fuzz $m/${dir#$m/} $fn ($t)"
      (cd "$dir" && GOWORK=off go test -run '^$' -fuzz "^${fn}\$" -fuzztime "$t" .) || exit 1
    done
  done < <(find "$m" -name '*_test.go' -not -path '*/testdata/*' | xargs grep -l '^func Fuzz' || true)
done
