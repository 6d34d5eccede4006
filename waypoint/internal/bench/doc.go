// Package bench holds the waypoint's side-by-side benchmarks (in its test
// files): throughput at 64 connections (wrk), latency at a fixed 1,000 req/s
// (fortio), CPU per 1,000 req/s and RSS of the proxy process (and of the
// stand-in destination ztunnel), for a direct connection to the backend,
// Debian's nginx as a reverse proxy, and the waypoint's L7 path with plain
// tunnels, behind inbound HBONE, and with HBONE on both legs, all on
// loopback in one run.
package bench
