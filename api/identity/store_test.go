package identity_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/amesh-dev/amesh/api/identity"
	"github.com/amesh-dev/amesh/api/identity/identitytest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// countingIssuer counts Issue calls and can tamper with the result.
type countingIssuer struct {
	*identitytest.CA
	calls  atomic.Int32
	mangle func([]*x509.Certificate) []*x509.Certificate
}

func (c *countingIssuer) Issue(ctx context.Context, id spiffeid.ID, csr []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	c.calls.Add(1)
	chain, err := c.CA.Issue(ctx, id, csr, ttl)
	if err == nil && c.mangle != nil {
		chain = c.mangle(chain)
	}
	return chain, err
}

func runStore(t *testing.T, iss identity.Issuer, opts identity.StoreOptions) *identity.Store {
	t.Helper()
	s := identity.NewStore(iss, opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return s
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

var testID = spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b")

func TestStoreSharesFirstFetch(t *testing.T) {
	t.Parallel()
	iss := &countingIssuer{CA: identitytest.Must("cluster.local")}
	s := runStore(t, iss, identity.StoreOptions{})
	var wg sync.WaitGroup
	certs := make([]*tls.Certificate, 20)
	for i := range certs {
		wg.Go(func() {
			c, err := s.Certificate(ctxT(t), testID)
			if err != nil {
				t.Error(err)
			}
			certs[i] = c
		})
	}
	wg.Wait()
	for _, c := range certs[1:] {
		if c != certs[0] {
			t.Fatal("callers got different certificates")
		}
	}
	if n := iss.calls.Load(); n != 1 {
		t.Fatalf("%d Issue calls, want 1", n)
	}
	if id, err := identity.LeafID(certs[0]); err != nil || id != testID {
		t.Fatalf("leaf is %v, %v", id, err)
	}
	if d := certs[0].Leaf.NotAfter.Sub(certs[0].Leaf.NotBefore); d < 23*time.Hour {
		t.Fatalf("default TTL gave a %v certificate", d)
	}
	snap := s.Snapshot()
	if len(snap) != 1 || snap[0].ID != testID || snap[0].State != "valid" || len(snap[0].Chain) != 1 {
		t.Fatalf("snapshot %+v", snap)
	}
	if want := hex.EncodeToString(iss.CA.Roots()[0].SubjectKeyId); want == "" || snap[0].AuthorityKeyID != want {
		t.Fatalf("snapshot authority key ID %q, want the root's subject key ID %q", snap[0].AuthorityKeyID, want)
	}
}

func TestStoreRefreshesAtHalfLife(t *testing.T) {
	t.Parallel()
	iss := &countingIssuer{CA: identitytest.Must("cluster.local")}
	s := runStore(t, iss, identity.StoreOptions{TTL: 3 * time.Second})
	c1, err := s.Certificate(ctxT(t), testID)
	if err != nil {
		t.Fatal(err)
	}
	half := c1.Leaf.NotBefore.Add(c1.Leaf.NotAfter.Sub(c1.Leaf.NotBefore) / 2)
	var c2 *tls.Certificate
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if c2, err = s.Certificate(ctxT(t), testID); err != nil {
			t.Fatal(err)
		}
		if c2 != c1 {
			break
		}
	}
	switched := time.Now()
	if c2 == c1 {
		t.Fatal("certificate was not refreshed")
	}
	if switched.Before(half) {
		t.Fatalf("refreshed at %v, before half-life %v", switched, half)
	}
	if switched.After(c1.Leaf.NotAfter) {
		t.Fatalf("refreshed at %v, after expiry %v", switched, c1.Leaf.NotAfter)
	}
	if c2.Leaf.SerialNumber.Cmp(c1.Leaf.SerialNumber) == 0 {
		t.Fatal("same serial after refresh")
	}
	snap := s.Snapshot()
	if len(snap) != 1 || len(snap[0].Previous) == 0 || snap[0].Previous[0].SerialNumber.Cmp(c1.Leaf.SerialNumber) != 0 {
		t.Fatalf("snapshot does not keep the previous certificate: %+v", snap)
	}
}

func TestStoreKeepsOldCertificateWhileFailing(t *testing.T) {
	t.Parallel()
	ca := identitytest.Must("cluster.local")
	s := runStore(t, ca, identity.StoreOptions{TTL: 3 * time.Second, InitialBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})
	c1, err := s.Certificate(ctxT(t), testID)
	if err != nil {
		t.Fatal(err)
	}
	ca.SetFailure(identitytest.ErrUnavailable)
	half := c1.Leaf.NotBefore.Add(c1.Leaf.NotAfter.Sub(c1.Leaf.NotBefore) / 2)
	time.Sleep(time.Until(half) + 300*time.Millisecond)
	if c, err := s.Certificate(ctxT(t), testID); err != nil || c != c1 {
		t.Fatalf("while refresh fails before expiry: %v, %v; want the old certificate", c, err)
	}
	snap := s.Snapshot()
	if snap[0].Failures == 0 || snap[0].LastError == "" || snap[0].State != "valid" {
		t.Fatalf("snapshot does not show the failures: %+v", snap[0])
	}
	time.Sleep(time.Until(c1.Leaf.NotAfter) + 50*time.Millisecond)
	if _, err := s.Certificate(ctxT(t), testID); !errors.Is(err, identitytest.ErrUnavailable) {
		t.Fatalf("after expiry: %v; want ErrUnavailable", err)
	}
	if st := s.Snapshot()[0].State; st != "expired" {
		t.Fatalf("state %q, want expired", st)
	}
	ca.SetFailure(nil)
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		c, err := s.Certificate(ctxT(t), testID)
		if err == nil {
			if c == c1 {
				t.Fatal("got the expired certificate")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery after the CA came back: %v", err)
		}
	}
}

func TestStoreBackoff(t *testing.T) {
	t.Parallel()
	iss := &countingIssuer{CA: identitytest.Must("cluster.local")}
	iss.SetFailure(identitytest.ErrUnavailable)
	s := runStore(t, iss, identity.StoreOptions{InitialBackoff: 20 * time.Millisecond, MaxBackoff: 80 * time.Millisecond})
	start := time.Now()
	if _, err := s.Certificate(ctxT(t), testID); !errors.Is(err, identitytest.ErrUnavailable) {
		t.Fatalf("first Certificate: %v; want ErrUnavailable", err)
	}
	// Fails fast while backing off rather than waiting for the next attempt.
	t0 := time.Now()
	if _, err := s.Certificate(ctxT(t), testID); err == nil || time.Since(t0) > 15*time.Millisecond && iss.calls.Load() == 1 {
		t.Fatalf("second Certificate: %v after %v", err, time.Since(t0))
	}
	time.Sleep(600 * time.Millisecond)
	n := int(iss.calls.Load())
	elapsed := time.Since(start)
	// Delays: [10,20], [20,40], then [40,80] ms each. Without backoff there
	// would be thousands of calls; with it at most elapsed/10ms.
	if lo, hi := 5, int(elapsed/(10*time.Millisecond))+1; n < lo || n > hi {
		t.Fatalf("%d Issue attempts in %v; want between %d and %d", n, elapsed, lo, hi)
	}
}

func TestStoreRejectsBadIssuance(t *testing.T) {
	t.Parallel()
	ca := identitytest.Must("cluster.local")
	otherKey, _ := ca.MustLeaf("a", "b")
	for name, mangle := range map[string]func([]*x509.Certificate) []*x509.Certificate{
		"empty chain": func([]*x509.Certificate) []*x509.Certificate { return nil },
		"wrong key":   func([]*x509.Certificate) []*x509.Certificate { return []*x509.Certificate{otherKey.Leaf} },
		"wrong id": func(c []*x509.Certificate) []*x509.Certificate {
			x, _ := ca.MustLeaf("other", "sa")
			return []*x509.Certificate{x.Leaf}
		},
	} {
		iss := &countingIssuer{CA: ca, mangle: mangle}
		s := runStore(t, iss, identity.StoreOptions{})
		if c, err := s.Certificate(ctxT(t), testID); err == nil {
			t.Errorf("%s: accepted %v", name, c.Leaf.URIs)
		}
	}
}

func TestStoreRelease(t *testing.T) {
	t.Parallel()
	iss := &countingIssuer{CA: identitytest.Must("cluster.local")}
	s := runStore(t, iss, identity.StoreOptions{TTL: 3 * time.Second})
	other := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/other")
	if _, err := s.Certificate(ctxT(t), testID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Certificate(ctxT(t), other); err != nil {
		t.Fatal(err)
	}
	s.Release(testID)
	snap := s.Snapshot()
	if len(snap) != 1 || snap[0].ID != other {
		t.Fatalf("snapshot after Release: %+v", snap)
	}
	before := iss.calls.Load()
	time.Sleep(2 * time.Second) // past other's half-life, testID's too
	if got := iss.calls.Load() - before; got < 1 || got > 2 {
		t.Fatalf("%d issues after Release; want only other's refreshes (1-2)", got)
	}
	if _, err := s.Certificate(ctxT(t), testID); err != nil {
		t.Fatalf("Certificate after Release: %v", err)
	}
}

func TestStoreLifecycle(t *testing.T) {
	t.Parallel()
	ca := identitytest.Must("cluster.local")
	s := identity.NewStore(ca, identity.StoreOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := s.Certificate(ctx, testID); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Certificate without Run: %v", err)
	}
	rctx, rcancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(rctx) }()
	if _, err := s.Certificate(ctxT(t), testID); err != nil {
		t.Fatal(err)
	}
	if err := s.Run(rctx); err == nil {
		t.Fatal("second Run succeeded")
	}
	rcancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := s.Certificate(ctxT(t), spiffeid.RequireFromString("spiffe://cluster.local/ns/x/sa/y")); !errors.Is(err, identity.ErrStoreStopped) {
		t.Fatalf("after Run returned: %v", err)
	}
}
