#!/usr/bin/env bash
# amesh on kind (needs Docker and kind; the local cluster needs neither).
#
#   e2e/kind/kind.sh up        create the cluster (2 workers), build and load
#                              the images, install amesh from manifests/
#   e2e/kind/kind.sh install   (re)install amesh on the existing cluster
#   e2e/kind/kind.sh e2e       run the e2e suite against it (up first if needed)
#   e2e/kind/kind.sh down      delete the cluster
#
# Environment: KIND_CLUSTER (amesh), KIND_NODE_IMAGE (kind's default),
# KUBECTL (kubectl on PATH; the Makefile passes the pinned one),
# CACHE_DIR (~/.cache/amesh: the kubeconfig is written there),
# E2E_RUN (a go test -run filter), E2E_TIMEOUT (45m).
#
# The e2e suite talks only to KUBECONFIG; AMESH_E2E_ENV=kind tells it to
# deploy the sample from manifests/overlays/kind/bookinfo.
set -euo pipefail
cd "$(dirname "$0")/../.."

name=${KIND_CLUSTER:-amesh}
cache=${CACHE_DIR:-$HOME/.cache/amesh}
kubeconfig="$cache/kind-$name.kubeconfig"
kubectl=${KUBECTL:-kubectl}
# The kind overlay expects these images (make images builds them).
registry=ghcr.io/amesh-dev
tag=dev
images=(amesh-controller ztunnel waypoint amesh-cni-agent sampleapp)

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "kind.sh: $1 not found on PATH: $2" >&2; exit 1; }
}
k() { "$kubectl" --kubeconfig "$kubeconfig" "$@"; }
step() { printf '\n== %s\n' "$*"; }

exists() { kind get clusters 2>/dev/null | grep -qx "$name"; }

up() {
  need kind "install it from https://kind.sigs.k8s.io"
  need docker "kind runs its nodes in Docker"
  need "$kubectl" "install kubectl or run make kube-bins"
  docker info >/dev/null 2>&1 || { echo "kind.sh: the Docker engine is not reachable" >&2; exit 1; }
  mkdir -p "$cache"
  if exists; then
    step "kind cluster $name exists"
  else
    step "creating kind cluster $name (1 control plane, 2 workers)"
    kind create cluster --name "$name" --config e2e/kind/config.yaml \
      ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 180s
  fi
  kind get kubeconfig --name "$name" >"$kubeconfig"
  step "building images ($registry/*:$tag)"
  IMAGE_REGISTRY=$registry IMAGE_TAG=$tag hack/images.sh "${images[@]}"
  step "loading images into the nodes"
  for i in "${images[@]}"; do
    kind load docker-image --name "$name" "$registry/$i:$tag"
  done
  install
}

install() {
  [ -f "$kubeconfig" ] || { echo "kind.sh: no kubeconfig $kubeconfig; run up first" >&2; exit 1; }
  step "installing the CRDs (server-side apply)"
  k apply --server-side --force-conflicts -k manifests/crds
  # (manifests/crds also holds the Gateway API admission policy: wait for CRDs only)
  k wait --for=condition=Established --timeout=120s crd --all
  step "installing amesh (manifests/overlays/kind)"
  k apply --server-side --force-conflicts -k manifests/overlays/kind
  k -n amesh-system rollout status deployment/amesh-controller --timeout=300s
  k -n amesh-system rollout status daemonset/amesh-cni-agent --timeout=300s
  k -n amesh-system rollout status daemonset/ztunnel --timeout=300s
  step "amesh is running"
  echo "export KUBECONFIG=$kubeconfig"
}

e2e() {
  exists && [ -f "$kubeconfig" ] || up
  step "e2e suite against kind cluster $name"
  (
    cd e2e
    KUBECONFIG="$kubeconfig" AMESH_E2E_ENV=kind \
      go test -tags e2e -count=1 -v -timeout "${E2E_TIMEOUT:-45m}" ${E2E_RUN:+-run "$E2E_RUN"} ./suite/...
  )
}

down() {
  need kind "install it from https://kind.sigs.k8s.io"
  if exists; then
    step "deleting kind cluster $name"
    kind delete cluster --name "$name"
  fi
  rm -f "$kubeconfig"
}

case "${1:-}" in
  up) up ;;
  install) install ;;
  e2e) e2e ;;
  down) down ;;
  *) echo "usage: $0 up|install|e2e|down" >&2; exit 2 ;;
esac
