#!/usr/bin/env bash
# Static checks that must pass before anything lands. Each module is checked
# on its own (GOWORK=off) so a missing require cannot hide behind go.work.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/bin/tools:$PATH"
modules=(api ztunnel waypoint controller cni-plugin e2e)
fail=0

echo "== gofmt"
bad=$(git ls-files '*.go' | xargs -r gofmt -l)
if [ -n "$bad" ]; then echo "gofmt would change:"; echo "$bad"; fail=1; fi

for m in "${modules[@]}" tools tools/kube tools/coredns; do
  echo "== go mod tidy -diff ($m)"
  (cd "$m" && GOWORK=off go mod tidy -diff) || fail=1
done

for m in "${modules[@]}"; do
  echo "== build, vet, staticcheck ($m)"
  (
    cd "$m"
    GOWORK=off go build ./...
    GOWORK=off go vet ./...
    GOWORK=off go vet -tags e2e ./...
    GOWORK=off staticcheck ./...
  ) || fail=1
done

echo "== go build (workspace)"
for m in "${modules[@]}"; do (cd "$m" && go build ./...) || fail=1; done

# make build (the binaries of the local cluster and the demo) uses the
# workspace; make unit and the images use GOWORK=off. Both must link the
# same versions of every module, or the tests would not test what ships:
# 'go work sync' brings the modules' requirements up to the workspace's.
echo "== workspace and GOWORK=off select the same module versions"
deps() { go list -deps -test -f '{{with .Module}}{{.Path}} {{.Version}}{{end}}' ./... | grep -v '^github.com/amesh-dev/amesh/' | sort -u; }
for m in "${modules[@]}"; do
  (
    cd "$m"
    if ! diff <(GOWORK=off deps) <(deps) >/tmp/amesh-verify-ws.$$; then
      echo "$m: versions differ between GOWORK=off (<) and the workspace (>); run 'go work sync' and commit:"
      cat /tmp/amesh-verify-ws.$$
      exit 1
    fi
  ) || fail=1
done
rm -f /tmp/amesh-verify-ws.$$

echo "== generated code is current"
hack/generate.sh
if [ -n "$(git status --porcelain -- api controller manifests e2e)" ]; then
  echo "generated code is stale; run 'make generate' and commit:"
  git status --porcelain -- api controller manifests e2e
  fail=1
fi

echo "== data plane does not link Kubernetes"
for m in api ztunnel waypoint; do
  (cd "$m" && GOWORK=off go test -count=1 -run 'TestNoKubernetesDeps' .) || fail=1
done
(cd cni-plugin && GOWORK=off go test -count=1 -run 'TestNoKubernetesDeps' ./cmd/amesh-cni) || fail=1

exit $fail
