#!/usr/bin/env bash
# Installs the Debian packages that amesh's tests use, when missing.
set -euo pipefail

pkgs=(
  iptables nftables iproute2 conntrack     # capture rules and node networking
  containernetworking-plugins              # reference CNI plugins (bridge, host-local, loopback)
  protobuf-compiler libprotobuf-dev        # protoc and the well-known .proto files (google/protobuf/*) for `make generate` / verify
  curl nghttp2-client wrk iperf3 nginx-light tcpdump  # real clients, load, baselines, captures
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "deps: missing Debian packages: ${missing[*]} (run as root or install them)" >&2
  exit 1
fi
echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
