// Package ztunnel is the amesh node L4 proxy module: the ztunnel binary
// (cmd/ztunnel) and its internal packages. This root package holds only the
// module-wide dependency test.
package ztunnel
