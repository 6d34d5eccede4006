package app_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amesh-dev/amesh/api/ca"
	pb "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/controller/apis/security/v1alpha1"
)

// TestReplicas runs two controllers: both serve discovery and
// certificates; only the leader writes status; when the leader stops, the
// other takes over the writes.
func TestReplicas(t *testing.T) {
	e := startEnv(t, nil)
	second := e.startApp(nil)
	e.node("node-a")
	zt := e.pod("amesh-system", "ztunnel-a", "ztunnel", "node-a", "10.3.0.2", nil, nil)
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{
		"amesh.dev/dataplane-mode": "ambient",
	}}})
	e.serviceAccount("shop", "web")
	web := e.pod("shop", "web-1", "web", "node-a", "10.3.1.1", map[string]string{"app": "web"}, nil)
	tok := e.token("amesh-system", "ztunnel", zt, "amesh")

	// The second replica, whether or not it leads, serves both.
	m := e.subscribeTo(second, tok, map[string]string{"kind": "ztunnel", "pod": "ztunnel-a"})
	within(t, 10*time.Second, m, func() bool { return m.get(pb.WorkloadType, string(web.UID)) != nil },
		func() string { return "second replica did not publish the pod" })
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	key, err := identity.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := identity.NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.NewClient(e.dialTo(second, tok, e.roots), nil).Create(context.Background(), id, csr, time.Hour); err != nil {
		t.Fatalf("second replica refused a valid certificate request: %v", err)
	}

	accepted := func(name string) func() bool {
		return func() bool {
			var ap v1alpha1.AuthorizationPolicy
			e.get("shop", name, &ap)
			return ap.Status.ObservedGeneration == ap.Generation && len(ap.Status.Conditions) > 0
		}
	}
	e.create(&v1alpha1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "one"}})
	within(t, 10*time.Second, nil, accepted("one"), func() string { return "no status written by the leader" })

	// Stop the first controller (it leads: it started first and the
	// second one waited for the lease). The second takes over.
	holder := func() string {
		var l coordinationv1.Lease
		e.get("amesh-system", "amesh-controller", &l)
		if l.Spec.HolderIdentity == nil {
			return ""
		}
		return *l.Spec.HolderIdentity
	}
	first := holder()
	if first == "" {
		t.Fatal("no leader")
	}
	e.stops[0]()
	e.create(&v1alpha1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "two"}})
	within(t, 30*time.Second, nil, accepted("two"), func() string { return "no status written after the leader stopped" })
	if h := holder(); h == first || h == "" {
		t.Fatalf("lease holder %q after the leader %q stopped", h, first)
	}
}

// TestCARotation replaces the CA Secret with an operator-provided root:
// the controller publishes the new root (discovery, ConfigMaps), signs
// with it and serves with a certificate from it; a broken Secret is
// ignored and the current authority kept.
func TestCARotation(t *testing.T) {
	e, m, tok := caEnv(t, "4")
	ctx := context.Background()

	// A broken Secret changes nothing.
	var sec corev1.Secret
	e.get("amesh-system", "amesh-ca", &sec)
	oldRoot := string(sec.Data["ca.crt"])
	sec.Data["tls.key"] = []byte("garbage")
	if err := e.c.Update(ctx, &sec); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if got := issue(t, e, tok, e.roots); got == nil {
		t.Fatal("no certificate after a broken CA Secret")
	}

	// The operator rotates to a new root.
	next, err := ca.NewRoot(spiffeid.RequireTrustDomainFromString("cluster.local"), 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := next.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	e.get("amesh-system", "amesh-ca", &sec)
	sec.Data = map[string][]byte{"tls.crt": next.CertPEM(), "tls.key": keyPEM, "ca.crt": next.RootsPEM()}
	if err := e.c.Update(ctx, &sec); err != nil {
		t.Fatal(err)
	}
	newRoot := strings.TrimSpace(string(next.RootsPEM()))
	within(t, 5*time.Second, m, func() bool {
		tb, _ := m.get(pb.TrustBundleType, "cluster.local").(*pb.TrustBundle)
		return tb != nil && len(tb.RootsPem) == 1 && strings.TrimSpace(tb.RootsPem[0]) == newRoot
	}, func() string { return "trust bundle still " + describe(m.get(pb.TrustBundleType, "cluster.local")) })
	within(t, 10*time.Second, nil, func() bool {
		var cm corev1.ConfigMap
		e.get("shop", "amesh-root-cert", &cm)
		return strings.TrimSpace(cm.Data["root-cert.pem"]) == newRoot
	}, func() string { return "root ConfigMap not updated" })

	newPool := x509.NewCertPool()
	newPool.AddCert(next.Certificate())
	leaf := issue(t, e, tok, newPool) // the serving certificate now chains to the new root
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: newPool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("certificate after rotation does not chain to the new root: %v", err)
	}
	oldPool := x509.NewCertPool()
	oldPool.AppendCertsFromPEM([]byte(oldRoot))
	conn, err := tls.Dial("tcp", e.app.GRPCAddr(), &tls.Config{RootCAs: oldPool, ServerName: "amesh-controller.amesh-system.svc", NextProtos: []string{"h2"}})
	if err == nil {
		conn.Close()
		t.Fatal("the serving certificate still verifies with the old root")
	}
}

// issue obtains a certificate for shop/web with the ztunnel token,
// verifying the controller with roots.
func issue(t *testing.T, e *env, tok string, roots *x509.CertPool) *x509.Certificate {
	t.Helper()
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	key, err := identity.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := identity.NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := ca.NewClient(e.dialTo(e.app, tok, roots), nil).Create(ctx, id, csr, time.Hour)
	if err != nil {
		t.Fatalf("certificate: %v", err)
	}
	return res.Chain[0]
}

// TestStagedRootRotation rotates the root as the operator procedure says,
// with a ztunnel subscribed throughout: (1) ca.crt holds the old and the
// new root while the old CA signs — both are published, certificates
// still chain to the old root; (2) tls.crt/tls.key become the new CA —
// certificates and the serving certificate chain to the new root, while
// those of the old root still verify against what is published, and a
// data-plane client that follows the published roots reaches the
// controller; (3) ca.crt holds the new root only — the old root is no
// longer published.
func TestStagedRootRotation(t *testing.T) {
	e, m, tok := caEnv(t, "5")
	ctx := context.Background()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	var sec corev1.Secret
	e.get("amesh-system", "amesh-ca", &sec)
	oldRoot := strings.TrimSpace(string(sec.Data["ca.crt"]))
	next, err := ca.NewRoot(td, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	nextKey, err := next.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	newRoot := strings.TrimSpace(string(next.RootsPEM()))
	pool := func(pems ...string) *x509.CertPool {
		p := x509.NewCertPool()
		for _, s := range pems {
			if !p.AppendCertsFromPEM([]byte(s)) {
				t.Fatal("bad PEM")
			}
		}
		return p
	}
	update := func(data map[string][]byte) {
		t.Helper()
		e.get("amesh-system", "amesh-ca", &sec)
		maps.Copy(sec.Data, data)
		if err := e.c.Update(ctx, &sec); err != nil {
			t.Fatal(err)
		}
	}
	published := func() []string {
		tb, _ := m.get(pb.TrustBundleType, "cluster.local").(*pb.TrustBundle)
		var out []string
		for _, r := range tb.GetRootsPem() {
			out = append(out, strings.TrimSpace(r))
		}
		return out
	}
	expectRoots := func(step string, want ...string) {
		t.Helper()
		within(t, 10*time.Second, m, func() bool { return slices.Equal(published(), want) },
			func() string { return step + ": trust bundle " + describe(m.get(pb.TrustBundleType, "cluster.local")) })
		within(t, 10*time.Second, nil, func() bool {
			var cm corev1.ConfigMap
			e.get("shop", "amesh-root-cert", &cm)
			return strings.TrimSpace(cm.Data["root-cert.pem"]) == strings.Join(want, "\n")
		}, func() string { return step + ": root ConfigMap not updated" })
	}
	verifies := func(leaf *x509.Certificate, roots *x509.CertPool) bool {
		_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		return err == nil
	}

	// 1: both roots published; the old CA still signs and serves.
	update(map[string][]byte{"ca.crt": []byte(oldRoot + "\n" + newRoot + "\n")})
	expectRoots("step 1", oldRoot, newRoot)
	oldLeaf := issue(t, e, tok, pool(oldRoot))
	if !verifies(oldLeaf, pool(oldRoot)) {
		t.Fatal("step 1: the certificate does not chain to the old root")
	}

	// 2: the new CA signs and serves; both roots still published.
	update(map[string][]byte{"tls.crt": next.CertPEM(), "tls.key": nextKey})
	expectRoots("step 2", newRoot, oldRoot)
	var newLeaf *x509.Certificate
	within(t, 10*time.Second, nil, func() bool {
		newLeaf = issue(t, e, tok, pool(newRoot, oldRoot))
		return verifies(newLeaf, pool(newRoot))
	}, func() string { return "step 2: certificates do not chain to the new root" })
	if !verifies(oldLeaf, pool(published()...)) {
		t.Fatal("step 2: a certificate of the old root no longer verifies against the published roots")
	}
	// A data-plane client that started with the old root file and follows
	// the published roots reaches the controller, now serving from the
	// new root.
	b := identity.NewBundle()
	if err := b.SetPEM(td, []byte(strings.Join(published(), "\n"))); err != nil {
		t.Fatal(err)
	}
	cfg := identity.ControllerTLS("amesh-controller.amesh-system.svc", identity.ControllerRoots(b, td, filepath.Join(t.TempDir(), "none")))
	cfg.NextProtos = []string{"h2"}
	conn, err := tls.Dial("tcp", e.app.GRPCAddr(), cfg)
	if err != nil {
		t.Fatalf("step 2: a client following the published roots cannot reach the controller: %v", err)
	}
	conn.Close()
	if conn, err := tls.Dial("tcp", e.app.GRPCAddr(), &tls.Config{RootCAs: pool(oldRoot),
		ServerName: "amesh-controller.amesh-system.svc", NextProtos: []string{"h2"}}); err == nil {
		conn.Close()
		t.Fatal("step 2: the serving certificate still chains to the old root")
	}

	// 3: the old root is dropped.
	update(map[string][]byte{"ca.crt": []byte(newRoot + "\n")})
	expectRoots("step 3", newRoot)
	if verifies(oldLeaf, pool(published()...)) {
		t.Fatal("step 3: a certificate of the old root still verifies against the published roots")
	}
	if !verifies(newLeaf, pool(published()...)) {
		t.Fatal("step 3: a certificate of the new root does not verify")
	}
}

// caEnv starts a controller with one node, a ztunnel subscribed to it and
// a pod of shop/web on that node (addresses in 10.<net>.0.0/16); it
// returns the ztunnel's discovery mirror and token.
func caEnv(t *testing.T, net string) (*env, *mirror, string) {
	t.Helper()
	e := startEnv(t, nil)
	e.node("node-a")
	zt := e.pod("amesh-system", "ztunnel-a", "ztunnel", "node-a", "10."+net+".0.2", nil, nil)
	e.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{
		"amesh.dev/dataplane-mode": "ambient",
	}}})
	e.serviceAccount("shop", "web")
	e.pod("shop", "web-1", "web", "node-a", "10."+net+".1.1", nil, nil)
	tok := e.token("amesh-system", "ztunnel", zt, "amesh")
	m := e.subscribe(tok, map[string]string{"kind": "ztunnel", "pod": "ztunnel-a"})
	select {
	case <-m.client.Synced():
	case <-time.After(10 * time.Second):
		t.Fatal("not synced")
	}
	return e, m, tok
}
