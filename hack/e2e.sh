#!/usr/bin/env bash
# Runs the end-to-end suite (e2e/suite, build tag e2e) on a local cluster of
# its own: starts it (hack/cluster.sh up), runs the suite against its
# KUBECONFIG (the suite installs amesh from manifests/overlays/local), and
# removes the cluster again — also when the suite fails — unless
# E2E_KEEP=1. `make e2e` builds what it needs first.
#
# Environment: E2E_CLUSTER (name, default e2e), E2E_CLUSTER_FLAGS (its own
# addresses, so that it runs beside a `make demo` cluster), E2E_RUN (a
# go test -run filter), E2E_TIMEOUT (30m), E2E_KEEP=1 (leave it running),
# AMESH_E2E_STRICT=1 (also run the tests of known gaps, see e2e/suite),
# plus what hack/cluster.sh needs (BIN, KUBE_BIN, COREDNS).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export CLUSTER_NAME=${E2E_CLUSTER:-e2e}
export CLUSTER_FLAGS=${E2E_CLUSTER_FLAGS:---node-cidr 172.30.230.0/24 --pod-cidr 10.230.0.0/16 --service-cidr 10.231.0.0/16}
state=${E2E_STATE_DIR:-/var/lib/amesh-cluster/$CLUSTER_NAME}

start=$(date +%s)
down() {
  if [ "${E2E_KEEP:-0}" = 1 ]; then
    echo "e2e: leaving cluster $CLUSTER_NAME running (export KUBECONFIG=$state/kubeconfig; make cluster-down CLUSTER_NAME=$CLUSTER_NAME)"
    return
  fi
  "$root/hack/cluster.sh" down >/dev/null || echo "e2e: removing cluster $CLUSTER_NAME failed" >&2
}

"$root/hack/cluster.sh" up
trap down EXIT
up=$(date +%s)

rc=0
(
  cd "$root/e2e"
  KUBECONFIG="$state/kubeconfig" AMESH_E2E_ENV=local \
    go test -tags e2e -count=1 -v -timeout "${E2E_TIMEOUT:-30m}" ${E2E_RUN:+-run "$E2E_RUN"} ./suite/...
) || rc=$?
if [ $rc != 0 ]; then
  echo "e2e: FAILED; cluster log: $state.log" >&2
  # The node agents' and components' logs are in the state directory,
  # which down removes: keep a copy for the post-mortem.
  keep=$(mktemp -d /tmp/amesh-e2e-logs.XXXXXX)
  cp -r "$state.log" "$keep/" 2>/dev/null || true
  find "$state" -name '*.log' -size -20M -exec cp --parents {} "$keep/" \; 2>/dev/null || true
  echo "e2e: logs copied to $keep" >&2
fi
echo "e2e: cluster up in $(( up - start ))s, suite in $(( $(date +%s) - up ))s"
exit $rc
