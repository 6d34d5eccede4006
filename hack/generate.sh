#!/usr/bin/env bash
# Regenerates all generated code: protobufs in api/ and e2e/, and (when the controller
# has CRD types) deepcopy functions and CRD manifests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/bin/tools:$PATH"

# api/ holds the wire contracts; e2e/ the sample application's ratings API.
for m in api e2e; do
  (
    cd "$m"
    for p in $(find . -name '*.proto' -not -path './testdata/*' | sort); do
      protoc -I . \
        --go_out=. --go_opt=paths=source_relative \
        --go-grpc_out=. --go-grpc_opt=paths=source_relative \
        "$p"
    done
  )
done

if [ -d controller/apis ]; then
  (
    cd controller
    controller-gen object:headerFile=../hack/boilerplate.go.txt paths=./apis/...
    controller-gen crd:allowDangerousTypes=false paths=./apis/... output:crd:artifacts:config=../manifests/base/crds
  )
fi
