// Package waypoint is the root of amesh's L7 proxy module: the waypoint
// binary (cmd/waypoint) and its internal packages. Nothing in this module may
// import Kubernetes packages.
package waypoint
