// Package zdsv1 holds the node agent ↔ ztunnel (ZDS) messages, generated from
// zds.proto.
package zdsv1
