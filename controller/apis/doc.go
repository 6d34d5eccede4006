// Package apis groups the amesh CRD API groups (security.amesh.dev and
// traffic.amesh.dev, in the subpackages). Its tests install the generated
// CRDs into a real kube-apiserver and check what admission accepts and
// refuses.
package apis
