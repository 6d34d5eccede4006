# syntax=docker/dockerfile:1.7
# amesh images: one multi-stage Dockerfile, one target per image.
#   make images             (or: docker buildx build --target ztunnel -t … .)
# Static Go binaries (CGO off, trimmed paths) on distroless/static. The
# binaries live in /usr/local/bin/<name>, as the local cluster's image table
# expects. Every module builds on its own (GOWORK=off), as in CI.

ARG GO_VERSION=1.26.8
ARG BASE_IMAGE=gcr.io/distroless/static-debian12:nonroot

# ---- sources -------------------------------------------------------------
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS src
WORKDIR /src
ENV CGO_ENABLED=0 GOWORK=off GOFLAGS="-trimpath -buildvcs=false"
COPY . .
ARG TARGETOS TARGETARCH
ENV GOOS=${TARGETOS} GOARCH=${TARGETARCH}

# ---- one build stage per image (a component that does not build does not
# ---- block the others) ---------------------------------------------------
# The data plane builds with grpcnotrace: otherwise gRPC links
# golang.org/x/net/trace, whose text/template looks methods up by name, and
# the linker then keeps every exported method of every linked type: +4 MB of
# binary, which is +4 MB of RSS (ztunnel/deps_test.go).
FROM src AS build-ztunnel
RUN --mount=type=cache,target=/root/.cache/go-build --mount=type=cache,target=/go/pkg/mod \
    cd ztunnel && go build -tags grpcnotrace -ldflags="-s -w" -o /out/ztunnel ./cmd/ztunnel

FROM src AS build-waypoint
RUN --mount=type=cache,target=/root/.cache/go-build --mount=type=cache,target=/go/pkg/mod \
    cd waypoint && go build -tags grpcnotrace -ldflags="-s -w" -o /out/waypoint ./cmd/waypoint

# kubectl-waypoint rides along in the controller image (handy with kubectl
# exec) once it exists.
FROM src AS build-controller
RUN --mount=type=cache,target=/root/.cache/go-build --mount=type=cache,target=/go/pkg/mod \
    cd controller && go build -ldflags="-s -w" -o /out/ ./cmd/amesh-controller && \
    if [ -d cmd/kubectl-waypoint ]; then go build -ldflags="-s -w" -o /out/ ./cmd/kubectl-waypoint; fi

FROM src AS build-cni
RUN --mount=type=cache,target=/root/.cache/go-build --mount=type=cache,target=/go/pkg/mod \
    cd cni-plugin && go build -ldflags="-s -w" -o /out/ ./cmd/amesh-cni-agent ./cmd/amesh-cni

FROM src AS build-sampleapp
RUN --mount=type=cache,target=/root/.cache/go-build --mount=type=cache,target=/go/pkg/mod \
    cd e2e && go build -ldflags="-s -w" -o /out/sampleapp ./cmd/sampleapp

# ---- images ----------------------------------------------------------------

# ztunnel runs as root with NET_ADMIN, SYS_ADMIN and NET_RAW (setns into pod
# network namespaces, SO_MARK, IP_TRANSPARENT); see manifests/base/ztunnel.yaml.
FROM ${BASE_IMAGE} AS ztunnel
COPY --from=build-ztunnel /out/ztunnel /usr/local/bin/ztunnel
USER 0:0
ENTRYPOINT ["/usr/local/bin/ztunnel"]

FROM ${BASE_IMAGE} AS waypoint
COPY --from=build-waypoint /out/waypoint /usr/local/bin/waypoint
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/waypoint"]

FROM ${BASE_IMAGE} AS amesh-controller
COPY --from=build-controller /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/amesh-controller"]

# The node agent copies /usr/local/bin/amesh-cni into the node's CNI bin dir.
FROM ${BASE_IMAGE} AS amesh-cni-agent
COPY --from=build-cni /out/amesh-cni-agent /out/amesh-cni /usr/local/bin/
USER 0:0
ENTRYPOINT ["/usr/local/bin/amesh-cni-agent"]

FROM ${BASE_IMAGE} AS sampleapp
COPY --from=build-sampleapp /out/sampleapp /usr/local/bin/sampleapp
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sampleapp"]
