package app

import (
	"errors"
	"net/netip"
	"testing"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/xds/xdsclient"

	"github.com/amesh-dev/amesh/ztunnel/internal/authz"
	"github.com/amesh-dev/amesh/ztunnel/internal/store"
)

// TestApplyReportsRejected: a discovery response with one invalid
// Authorization among valid ones is applied except for it, and reported
// to the xDS client as an *xdsclient.RejectedError naming only it (so that the
// client NACKs it and keeps track of the rest); the good DENY applies and
// the bad policy's namespace is closed.
func TestApplyReportsRejected(t *testing.T) {
	st := store.New("cluster.local")
	deny := &discoveryv1.Authorization{Name: "deny-all", Namespace: "a", Scope: discoveryv1.Authorization_SCOPE_NAMESPACE,
		Action: discoveryv1.Authorization_ACTION_DENY, Rules: []*discoveryv1.Rule{{}}}
	bad := &discoveryv1.Authorization{Name: "allow", Namespace: "b", Scope: discoveryv1.Authorization_SCOPE_NAMESPACE,
		Rules: []*discoveryv1.Rule{{To: []*discoveryv1.Operation{{Ports: []uint32{70000}}}}}}
	err := apply(st, discoveryv1.AuthorizationType, []*xdsclient.Resource{{Name: "a/deny-all", Body: deny}, {Name: "b/allow", Body: bad}}, nil)
	rej, ok := errors.AsType[*xdsclient.RejectedError](err)
	if !ok || len(rej.Rejected) != 1 || rej.Rejected["b/allow"] == nil {
		t.Fatalf("apply error = %v, want an *xdsclient.RejectedError naming b/allow only", err)
	}
	for _, ns := range []string{"a", "b"} {
		c := &authz.Conn{SourceIP: netip.MustParseAddr("10.0.0.1"), DestinationIP: netip.MustParseAddr("10.0.0.2"), DestinationPort: 80}
		if d := authz.Evaluate(st.Policies(ns, nil), c); d.Allowed {
			t.Errorf("connection into namespace %s allowed: %s", ns, d.Reason)
		}
	}
	if err := apply(st, discoveryv1.AuthorizationType, nil, []string{"b/allow"}); err != nil {
		t.Fatalf("removal: %v", err)
	}
}
