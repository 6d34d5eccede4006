// Package cav1 is the certificate-signing service that ztunnel and waypoints
// call on the controller (generated from ca.proto).
package cav1
