#!/usr/bin/env bash
# Builds the pinned CoreDNS (tools/coredns) from source into the path given
# as $1, once per pin. The local cluster runs it as its cluster DNS.
set -euo pipefail
out=$1
[ -x "$out" ] && exit 0
mkdir -p "$(dirname "$out")"
echo "coredns: building $(grep -m1 'github.com/coredns/coredns ' "$(dirname "$0")/../tools/coredns/go.mod" | xargs) into $out (first time only)"
cd "$(dirname "$0")/../tools/coredns"
start=$(date +%s)
GOWORK=off nice -n 10 go build -trimpath -o "$out.tmp" .
mv "$out.tmp" "$out"
echo "coredns: built in $(( $(date +%s) - start ))s"
