// Package api is the root of amesh's wire-contract module: the protobuf
// resources and services shared by the controller and the data plane, and the
// reference client and server code for them (hbone, identity, xds, zds,
// capture). Nothing in this module may import Kubernetes packages.
package api
