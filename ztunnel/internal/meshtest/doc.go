// Package meshtest holds ztunnel's integration tests and benchmarks: real
// network namespaces for two nodes and their pods, the node agent's
// capture rules (api/capture), a fake controller built from the api
// module's real xDS and CA servers, and ztunnel processes built from
// cmd/ztunnel. They need root and skip otherwise.
package meshtest
