# amesh — build, test and verify. `make help` lists the targets.

SHELL := /usr/bin/env bash -o pipefail
.DEFAULT_GOAL := help

GO        ?= go
MODULES   := api ztunnel waypoint controller cni-plugin e2e
BIN       := $(CURDIR)/bin
TOOLS_BIN := $(BIN)/tools
CACHE_DIR ?= $(HOME)/.cache/amesh
# The Kubernetes and etcd server binaries are built from source (tools/kube)
# and cached under CACHE_DIR, keyed by the pinned module versions.
KUBE_KEY  := $(shell sha256sum tools/kube/go.sum 2>/dev/null | cut -c1-12)
KUBE_BIN  := $(CACHE_DIR)/kube-$(KUBE_KEY)
# CoreDNS (the local cluster's DNS) is built from source too (tools/coredns).
COREDNS_KEY := $(shell sha256sum tools/coredns/go.sum 2>/dev/null | cut -c1-12)
COREDNS     := $(CACHE_DIR)/coredns-$(COREDNS_KEY)/coredns
# The local cluster: `make cluster-up CLUSTER_NAME=dev CLUSTER_FLAGS="--nodes 3"`.
CLUSTER_NAME  ?= amesh
CLUSTER_FLAGS ?=
FUZZTIME  ?= 10s
BENCHTIME ?= 1s
# The data plane's build tags (as in the Dockerfile): grpcnotrace keeps
# gRPC from linking golang.org/x/net/trace and its text/template, which
# would make the linker keep every exported method (+4 MB of binary and RSS).
DATAPLANE_TAGS := grpcnotrace
export PATH := $(TOOLS_BIN):$(PATH)

##@ General
.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} \
	  /^[a-zA-Z0-9_.-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

.PHONY: deps
deps: ## Install the Debian packages the tests need (idempotent; needs root).
	@hack/deps.sh

.PHONY: tools
tools: ## Build the pinned developer tools (tools/go.mod) into bin/tools.
	@mkdir -p $(TOOLS_BIN)
	cd tools && GOWORK=off GOBIN=$(TOOLS_BIN) $(GO) install tool

.PHONY: kube-bins
kube-bins: ## Build the pinned kube-apiserver, etcd, kubectl… from source (cached).
	@hack/kube-bins.sh "$(KUBE_BIN)"

.PHONY: print-kube-bin
print-kube-bin: ## Print the directory holding the pinned Kubernetes binaries (KUBEBUILDER_ASSETS).
	@echo "$(KUBE_BIN)"

.PHONY: coredns
coredns: ## Build the pinned CoreDNS for the local cluster from source (cached).
	@hack/coredns.sh "$(COREDNS)"

.PHONY: print-coredns
print-coredns: ## Print the path of the pinned CoreDNS binary.
	@echo "$(COREDNS)"

##@ Build
.PHONY: build
build: ## Build every binary into bin/.
	@mkdir -p $(BIN)
	@for m in ztunnel waypoint controller cni-plugin; do \
	  tags=; case $$m in ztunnel|waypoint) tags="-tags $(DATAPLANE_TAGS)";; esac; \
	  if [ -d $$m/cmd ]; then (cd $$m && $(GO) build $$tags -o $(BIN)/ ./cmd/...) || exit 1; fi; \
	done

.PHONY: cluster-bins
cluster-bins: ## Build the local cluster's binaries (amesh-cluster, amesh-node, echoserver, …) into bin/.
	@mkdir -p $(BIN)
	cd e2e && $(GO) build -o $(BIN)/ ./cmd/...

.PHONY: generate
generate: tools ## Regenerate protobuf, deepcopy and CRD code.
	@hack/generate.sh

##@ Test
.PHONY: test
test: deps kube-bins coredns unit e2e ## Run every test: unit and integration of every module, then the e2e suite on a local cluster (the README's test command).

.PHONY: unit
unit: ## Unit + integration tests of every module with -race, each with GOWORK=off.
	@for m in $(MODULES); do \
	  echo "== go test $$m"; \
	  (cd $$m && KUBEBUILDER_ASSETS=$(KUBE_BIN) AMESH_COREDNS=$(COREDNS) GOWORK=off $(GO) test -race -count=1 ./...) || exit 1; \
	done

.PHONY: fuzz
fuzz: ## Run every fuzz target for FUZZTIME (default 10s).
	@hack/fuzz.sh "$(FUZZTIME)"

.PHONY: bench
bench: tools ## Run the benchmarks (baselines side by side), one package at a time; the controller end-to-end one needs make kube-bins.
	@for m in $(MODULES); do \
	  tags=; case $$m in ztunnel|waypoint) tags="-tags $(DATAPLANE_TAGS)";; esac; \
	  (cd $$m && KUBEBUILDER_ASSETS=$(KUBE_BIN) GOWORK=off $(GO) test $$tags -p 1 -timeout 60m -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) ./...) || exit 1; \
	done

.PHONY: bench-smoke
bench-smoke: tools kube-bins ## Every benchmark once at its smallest size (CI: they keep working; make bench measures).
	@KUBEBUILDER_ASSETS=$(KUBE_BIN) hack/bench-smoke.sh

##@ End to end and demo (root; the local cluster needs no container engine)
.PHONY: demo
demo: build cluster-up ## The README's first command: local cluster, amesh, sample, waypoint, canary; prints identities, split, metrics. Leaves it running.
	@$(BIN)/amesh-demo -cluster $(CLUSTER_NAME) -kubectl-waypoint $(BIN)/kubectl-waypoint

.PHONY: demo-down
demo-down: cluster-down ## Remove the demo: stop the local cluster and everything in it.

.PHONY: e2e
e2e: deps kube-bins coredns build cluster-bins ## Run the e2e suite on a fresh local cluster (E2E_RUN=<filter>, E2E_KEEP=1 keeps the cluster).
	@KUBE_BIN=$(KUBE_BIN) COREDNS=$(COREDNS) BIN=$(BIN) hack/e2e.sh

##@ Local cluster (root; no container engine needed)
.PHONY: cluster-up
cluster-up: deps kube-bins coredns cluster-bins ## Start the local cluster (CLUSTER_NAME, CLUSTER_FLAGS); prints progress and the KUBECONFIG.
	@KUBE_BIN=$(KUBE_BIN) COREDNS=$(COREDNS) BIN=$(BIN) CLUSTER_NAME=$(CLUSTER_NAME) CLUSTER_FLAGS="$(CLUSTER_FLAGS)" hack/cluster.sh up

.PHONY: cluster-down
cluster-down: cluster-bins ## Stop the local cluster and remove everything it created (idempotent).
	@KUBE_BIN=$(KUBE_BIN) COREDNS=$(COREDNS) BIN=$(BIN) CLUSTER_NAME=$(CLUSTER_NAME) CLUSTER_FLAGS="$(CLUSTER_FLAGS)" hack/cluster.sh down

.PHONY: cluster-status
cluster-status: cluster-bins ## Report whether the local cluster runs, and its KUBECONFIG.
	@KUBE_BIN=$(KUBE_BIN) COREDNS=$(COREDNS) BIN=$(BIN) CLUSTER_NAME=$(CLUSTER_NAME) CLUSTER_FLAGS="$(CLUSTER_FLAGS)" hack/cluster.sh status

##@ Verify
.PHONY: verify
verify: tools ## gofmt, vet, staticcheck, go mod tidy -diff, generated code current, GOWORK=off builds.
	@hack/verify.sh

##@ Images and kind (need Docker; the local cluster does not)
IMAGE_REGISTRY ?= ghcr.io/amesh-dev
IMAGE_TAG      ?= dev
KUBECTL        ?= $(if $(wildcard $(KUBE_BIN)/kubectl),$(KUBE_BIN)/kubectl,kubectl)

.PHONY: images
images: ## Build the container images as $(IMAGE_REGISTRY)/<name>:$(IMAGE_TAG) (docker buildx).
	@IMAGE_REGISTRY=$(IMAGE_REGISTRY) IMAGE_TAG=$(IMAGE_TAG) hack/images.sh

.PHONY: kind-up
kind-up: ## Create a kind cluster (2 workers), load the images, install amesh from manifests/.
	@KUBECTL=$(KUBECTL) CACHE_DIR=$(CACHE_DIR) e2e/kind/kind.sh up

.PHONY: e2e-kind
e2e-kind: ## Run the e2e suite against the kind cluster (creating it if needed).
	@KUBECTL=$(KUBECTL) CACHE_DIR=$(CACHE_DIR) e2e/kind/kind.sh e2e

.PHONY: kind-down
kind-down: ## Delete the kind cluster.
	@KUBECTL=$(KUBECTL) CACHE_DIR=$(CACHE_DIR) e2e/kind/kind.sh down
