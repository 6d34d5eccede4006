// Package sample is a small bookinfo-like application used by the demo and
// the end-to-end suite: productpage (HTTP) calls details (HTTP) and reviews
// (HTTP, versions v1 and v2); reviews v2 calls ratings (gRPC, with the
// standard gRPC health service). A client role drives traffic from inside
// the cluster and reports what it measured.
//
// Every response names the instance that served it (headers
// x-amesh-service, x-amesh-version, x-amesh-served-by) and the client
// address it saw (x-amesh-peer), so that tests can measure traffic splits
// and show what the mesh did. Test knobs, set per request by header or per
// pod by environment, fail a fraction of requests, add delay and echo the
// request back; every instance counts the requests it received (/stats).
package sample
