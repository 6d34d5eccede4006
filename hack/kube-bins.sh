#!/usr/bin/env bash
# Builds the pinned Kubernetes server binaries and etcd from source
# (tools/kube/go.mod) into the directory given as $1, once per pin.
set -euo pipefail
out=$1
bins=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl etcd)
have=1
for b in "${bins[@]}"; do [ -x "$out/$b" ] || have=0; done
[ $have = 1 ] && exit 0
mkdir -p "$out"
echo "kube-bins: building ${bins[*]} from source into $out (first time only; takes a while)"
cd "$(dirname "$0")/../tools/kube"
start=$(date +%s)
GOWORK=off go build -o "$out/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kube-proxy \
  k8s.io/kubernetes/cmd/kubectl \
  go.etcd.io/etcd/server/v3
mv "$out/server" "$out/etcd"
echo "kube-bins: built in $(( $(date +%s) - start ))s"
