//go:build e2e

package suite

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
	"github.com/amesh-dev/amesh/e2e/internal/mesh"
)

// expectReachable polls until 5 requests from d to target all succeed
// (want true) or all fail (want false), and fails the test otherwise.
func expectReachable(ctx context.Context, t *testing.T, d *mesh.Driver, target string, want bool, within time.Duration) {
	t.Helper()
	const n = 5
	err := kube.Poll(ctx, time.Second, within, func(ctx context.Context) (bool, error) {
		r, err := d.Get(ctx, target, n)
		if err != nil {
			return false, err
		}
		switch {
		case want && r.OK == n:
			return true, nil
		case !want && r.OK == 0:
			return true, nil
		}
		return false, fmt.Errorf("%d of %d OK (codes %v, errors %v), want %s", r.OK, n, r.Codes, r.Errors, map[bool]string{true: "all", false: "none"}[want])
	})
	if err != nil {
		t.Fatalf("%s from %s/%s: %v", target, d.Namespace, d.Pod, err)
	}
}

// TestL4DenyByPrincipal: an AuthorizationPolicy DENY naming one client's
// SPIFFE identity stops that client at the server's ztunnel, while another
// client of the same server keeps working; removing the policy lets the
// first client in again.
func TestL4DenyByPrincipal(t *testing.T) {
	ns := namespace(t, "deny", true)
	server := mesh.Workload{Name: "server", Service: true, Node: shared.nodes[1]}
	good := mesh.Workload{Name: "good", Role: "client", Node: shared.nodes[0]}
	bad := mesh.Workload{Name: "bad", Role: "client", Node: shared.nodes[0]}
	deploy(t, ns, server, good, bad)
	ctx := ctxFor(t, 3*time.Minute)
	if err := mesh.WaitRedirection(ctx, shared.c, ns, "", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	dg, db := driver(t, ns, good), driver(t, ns, bad)
	target := fmt.Sprintf("http://server.%s:%d/echo", ns, mesh.PortApp)
	expectReachable(ctx, t, dg, target, true, 30*time.Second)
	expectReachable(ctx, t, db, target, true, 30*time.Second)

	policy := `apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: deny-bad
  namespace: %s
spec:
  selector:
    matchLabels:
      app: server
  action: DENY
  rules:
  - from:
    - source:
        principals: ["%s"]
`
	badID := mesh.Identity(ns, "bad")
	if err := shared.c.ApplyYAML(ctx, policy, ns, trimSpiffe(badID)); err != nil {
		t.Fatal(err)
	}
	expectReachable(ctx, t, db, target, false, 30*time.Second)
	expectReachable(ctx, t, dg, target, true, 5*time.Second)

	// The denial is the policy's: without it the bad client is back.
	if err := shared.c.DeleteYAML(ctx, policy, ns, trimSpiffe(badID)); err != nil {
		t.Fatal(err)
	}
	expectReachable(ctx, t, db, target, true, 30*time.Second)
}

// trimSpiffe turns a SPIFFE ID into an AuthorizationPolicy principal
// (Istio's form: trust domain and path, no scheme).
func trimSpiffe(id string) string { return id[len("spiffe://"):] }

// TestPeerAuthentication: a client outside the mesh reaches an enrolled
// server in plaintext under the default PERMISSIVE mode; STRICT refuses it
// while an enrolled client still gets through; PERMISSIVE admits it again.
func TestPeerAuthentication(t *testing.T) {
	ns := namespace(t, "peerauth", true)
	server := mesh.Workload{Name: "server", Service: true, Node: shared.nodes[1]}
	meshed := mesh.Workload{Name: "meshed", Role: "client", Node: shared.nodes[0]}
	outside := mesh.Workload{Name: "outside", Role: "client", Node: shared.nodes[0],
		PodLabels: map[string]string{mesh.LabelDataplaneMode: mesh.ModeNone}}
	deploy(t, ns, server, meshed, outside)
	ctx := ctxFor(t, 3*time.Minute)
	if err := mesh.WaitRedirection(ctx, shared.c, ns, "", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	if a := pod(t, ns, outside).Annotations[mesh.AnnotRedirection]; a != "" {
		t.Fatalf("the opted-out client is redirected: %s=%q", mesh.AnnotRedirection, a)
	}
	dm, do := driver(t, ns, meshed), driver(t, ns, outside)
	target := fmt.Sprintf("http://server.%s:%d/echo", ns, mesh.PortApp)
	expectReachable(ctx, t, dm, target, true, 30*time.Second)
	expectReachable(ctx, t, do, target, true, 30*time.Second)

	pa := `apiVersion: security.amesh.dev/v1alpha1
kind: PeerAuthentication
metadata:
  name: default
  namespace: %s
spec:
  mtls:
    mode: %s
`
	if err := shared.c.ApplyYAML(ctx, pa, ns, "STRICT"); err != nil {
		t.Fatal(err)
	}
	expectReachable(ctx, t, do, target, false, 30*time.Second)
	expectReachable(ctx, t, dm, target, true, 5*time.Second)

	if err := shared.c.ApplyYAML(ctx, pa, ns, "PERMISSIVE"); err != nil {
		t.Fatal(err)
	}
	expectReachable(ctx, t, do, target, true, 30*time.Second)
}
