#!/usr/bin/env bash
# Copies the Gateway API CRDs (standard and experimental channels) of the
# sigs.k8s.io/gateway-api version that the controller module requires into
# manifests/gateway-api/<channel>/, unchanged, with the upstream
# kustomization of each channel. The files come from the Go module cache
# (downloaded through the module proxy when missing), so the result is
# reproducible and always matches the Go types the controller is built with.
#
#   hack/gateway-api-crds.sh           update manifests/gateway-api
#   hack/gateway-api-crds.sh --check   fail if manifests/gateway-api is not current
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=manifests/gateway-api

mode=update
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

version=$(cd controller && GOWORK=off go list -m -f '{{.Version}}' sigs.k8s.io/gateway-api)
if [ -z "$version" ]; then
  echo "controller/go.mod does not require sigs.k8s.io/gateway-api" >&2
  exit 1
fi
dir=$(cd controller && GOWORK=off go mod download -json "sigs.k8s.io/gateway-api@$version" |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
if [ ! -d "$dir/config/crd" ]; then
  echo "sigs.k8s.io/gateway-api@$version: no config/crd in the module ($dir)" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for channel in standard experimental; do
  src="$dir/config/crd/$channel"
  mkdir -p "$tmp/$channel"
  for f in "$src"/*.yaml; do
    install -m 0644 "$f" "$tmp/$channel/"
  done
  if [ ! -f "$tmp/$channel/kustomization.yaml" ]; then
    # The channel ships no kustomization of its own: list its files.
    files=$(cd "$tmp/$channel" && ls -1 -- *.yaml)
    {
      echo "# Written by hack/gateway-api-crds.sh: the files of this channel."
      echo "resources:"
      for f in $files; do echo "- $f"; done
    } >"$tmp/$channel/kustomization.yaml"
  fi
done
cat >"$tmp/README.md" <<MD
# Gateway API CRDs $version

Copied unchanged from the \`sigs.k8s.io/gateway-api@$version\` Go module (the
version \`controller/go.mod\` requires) by \`hack/gateway-api-crds.sh\`; do not
edit. \`make generate\` refreshes them and \`make verify\` fails when they are stale.

amesh installs the **experimental** channel (\`manifests/base\` includes it): it is
a superset of the standard channel and carries the HTTPRoute fields amesh
implements that are not yet standard, such as \`retry\`. A cluster that must
stay on the standard channel can apply \`standard/\` instead; HTTPRoute retries
are then unavailable.
MD

if [ "$mode" = check ]; then
  if ! diff -r "$tmp" "$root/$out" >/dev/null 2>&1; then
    echo "$out is not the Gateway API $version CRDs; run hack/gateway-api-crds.sh" >&2
    diff -r "$tmp" "$root/$out" | head -20 >&2 || true
    exit 1
  fi
  echo "$out is current (Gateway API $version)"
  exit 0
fi
rm -rf "${root:?}/$out"
mkdir -p "$(dirname "$root/$out")"
cp -r "$tmp" "$root/$out"
chmod 0755 "$root/$out" "$root/$out"/*/
echo "$out: Gateway API $version"
