#!/usr/bin/env bash
# Builds the pinned Kubernetes server binaries and etcd from source
# (tools/kube/go.mod) into the directory given as $1, once per pin. The
# binaries carry the pinned version (as release builds do), so that
# `kubectl version`, node versions and version checks (Helm's kubeVersion)
# see v1.x.y rather than v0.0.0-master.
set -euo pipefail
out=$1
bins=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl etcd)
cd "$(dirname "$0")/../tools/kube"
ver=$(GOWORK=off go list -m -f '{{.Version}}' k8s.io/kubernetes)
have=1
for b in "${bins[@]}"; do [ -x "$out/$b" ] || have=0; done
[ "$(cat "$out/.version" 2>/dev/null)" = "$ver" ] || have=0
[ $have = 1 ] && exit 0
mkdir -p "$out"
echo "kube-bins: building ${bins[*]} $ver from source into $out (first time only; takes a while)"
start=$(date +%s)
major=${ver#v}; major=${major%%.*}
minor=${ver#v*.}; minor=${minor%%.*}
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$ver -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
tmp=$(mktemp -d "$out/.build-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
GOWORK=off go build -ldflags "$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kube-proxy \
  k8s.io/kubernetes/cmd/kubectl \
  go.etcd.io/etcd/server/v3
mv "$tmp/server" "$tmp/etcd"
# Replace each binary atomically: tests may be running the old ones.
for b in "${bins[@]}"; do mv -f "$tmp/$b" "$out/$b"; done
echo "$ver" > "$out/.version"
echo "kube-bins: built in $(( $(date +%s) - start ))s"
