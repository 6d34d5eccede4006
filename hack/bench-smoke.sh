#!/usr/bin/env bash
# Runs every benchmark once, at its smallest size and shortest load (CI):
# the benchmarks must keep working — build, start their baselines and
# peers (fortio, iperf3, wrk, nginx, a real kube-apiserver), and report.
# The numbers mean nothing at this size; `make bench` measures. A benchmark
# that skips (a missing tool, no root) fails the smoke run (-v: go test
# reports a skipped benchmark only in verbose mode).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/bin/tools:$PATH"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
start=$(date +%s)

run() {
  local m=$1
  shift
  echo "== bench-smoke $m: $*"
  (cd "$m" && GOWORK=off go test -v -count=1 -run '^$' -benchtime 1x -timeout 15m "$@" 2>&1) | tee -a "$out"
}

run api -bench . ./...
run ztunnel -bench . ./internal/netns
run ztunnel -bench . ./internal/meshtest -load-duration 1s -idle-conns 100
BENCH_ROUNDS=1 BENCH_SECONDS=1 run waypoint -bench . ./...
run cni-plugin -bench . ./...
# The controller's benchmarks at their baseline size only (1,000 pods).
run controller -bench 'Translate' ./internal/translate
run controller -bench 'Push/pods=1000$' ./internal/push
run controller -bench 'Controller/pods=1000$' ./internal/app

if grep -E -- '--- (SKIP|FAIL)' "$out"; then
  echo "bench-smoke: a benchmark skipped or failed (above)" >&2
  exit 1
fi
n=$(grep -cE '^Benchmark' "$out" || true)
echo "bench-smoke: $n benchmark results in $(( $(date +%s) - start ))s"
