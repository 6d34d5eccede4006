#!/usr/bin/env bash
# Starts, stops or inspects the local cluster (e2e/cluster) with the pinned
# binaries: hack/cluster.sh up|down|status [amesh-cluster flags…].
# `make cluster-up` / `cluster-down` / `cluster-status` call it after
# building what it needs; run directly, it builds them through make.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
verb=${1:-}
case "$verb" in up|down|status) shift ;; *) echo "usage: $0 up|down|status [flags]" >&2; exit 2 ;; esac
if [ "$(id -u)" != 0 ]; then
  echo "cluster: the local cluster needs root (network namespaces, mounts, cgroups)" >&2
  exit 1
fi
BIN=${BIN:-$root/bin}
if [ -z "${KUBE_BIN:-}" ] || [ -z "${COREDNS:-}" ]; then
  make -C "$root" -s kube-bins coredns cluster-bins >&2
  KUBE_BIN=$(make -C "$root" -s print-kube-bin)
  COREDNS=$(make -C "$root" -s print-coredns)
fi
exec "$BIN/amesh-cluster" "$verb" \
  --name "${CLUSTER_NAME:-amesh}" \
  --kube-bin-dir "$KUBE_BIN" \
  --coredns "$COREDNS" \
  --node-binary "$BIN/amesh-node" \
  --bin-dir "$BIN" \
  ${CLUSTER_FLAGS:-} "$@"
