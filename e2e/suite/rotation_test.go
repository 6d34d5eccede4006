//go:build e2e

package suite

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
	"github.com/amesh-dev/amesh/e2e/internal/mesh"
	"github.com/amesh-dev/amesh/e2e/internal/pki"
	"github.com/amesh-dev/amesh/e2e/sample"
)

// TestRootRotation rotates the mesh root as docs/DESIGN.md says, under a
// steady load between enrolled pods of two nodes: (1) the CA Secret's
// ca.crt gets the new root next to the old one; (2) tls.crt/tls.key become
// the new CA, and the controller restarts, so every ztunnel reconnects to
// a controller serving from the new root. No request fails. Workloads
// started afterwards get certificates of the new root, and they and the
// workloads holding certificates of the old root reach each other both
// ways. The suite's later tests run on the rotated mesh; the old root stays
// published (step 3 waits for the old certificates to expire: 24 h).
func TestRootRotation(t *testing.T) {
	p := newPair(t, "rotate", true)
	ctx := ctxFor(t, 6*time.Minute)
	c := shared.c
	if err := mesh.WaitRedirection(ctx, c, p.ns, "", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	d := driver(t, p.ns, p.client)
	expectReachable(ctx, t, d, p.url("/echo"), true, 30*time.Second)

	secrets := c.Core.CoreV1().Secrets(mesh.SystemNamespace)
	sec, err := secrets.Get(ctx, "amesh-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	oldRoots, err := parseCerts(sec.Data["ca.crt"])
	if err != nil || len(oldRoots) == 0 {
		t.Fatalf("CA Secret ca.crt: %d certificates, %v", len(oldRoots), err)
	}
	next, err := pki.NewCA("amesh e2e rotated root")
	if err != nil {
		t.Fatal(err)
	}
	nextKey, err := next.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	oldKeyID := hex.EncodeToString(oldRoots[0].SubjectKeyId)
	newKeyID := hex.EncodeToString(next.Cert.SubjectKeyId)
	both := append(append([]byte(nil), sec.Data["ca.crt"]...), next.CertPEM...)
	update := func(data map[string][]byte) {
		t.Helper()
		s, err := secrets.Get(ctx, "amesh-ca", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range data {
			s.Data[k] = v
		}
		if _, err := secrets.Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// A steady load across the rotation, each request on a new
	// connection (a new HBONE handshake: both ends verify each other
	// against the roots of the moment).
	res := make(chan sample.LoadResult, 1)
	errc := make(chan error, 1)
	go func() {
		r, err := d.Run(ctx, url.Values{"url": {p.url("/echo")}, "qps": {"50"}, "duration": {"45s"}, "c": {"4"}, "newconn": {"true"}, "timeout": {"2s"}})
		res <- r
		errc <- err
	}()
	time.Sleep(2 * time.Second)

	// 1: both roots published; the old CA still signs.
	update(map[string][]byte{"ca.crt": both})
	err = kube.Poll(ctx, 500*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, error) {
		cm, err := c.Core.CoreV1().ConfigMaps(p.ns).Get(ctx, "amesh-root-cert", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		roots, err := parseCerts([]byte(cm.Data["root-cert.pem"]))
		if err != nil || len(roots) != 2 {
			return false, fmt.Errorf("root ConfigMap holds %d roots (%v)", len(roots), err)
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("step 1: %v", err)
	}
	// Every ztunnel holds both roots before the new CA signs.
	for _, node := range shared.nodes[:2] {
		err := kube.Poll(ctx, 500*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, error) {
			d, err := ztunnelDump(ctx, node)
			if err != nil {
				return false, err
			}
			var have []string
			for _, r := range d.TrustBundles[mesh.TrustDomain].Roots {
				have = append(have, r.SubjectKeyID)
			}
			if !slices.Contains(have, oldKeyID) || !slices.Contains(have, newKeyID) {
				return false, fmt.Errorf("ztunnel on %s holds roots %v, want %s and %s", node, have, oldKeyID, newKeyID)
			}
			return true, nil
		})
		if err != nil {
			t.Fatalf("step 1: %v", err)
		}
	}
	t.Log("step 1: both roots published and held by every ztunnel")

	// 2: the new CA signs; the controller restarts, and every ztunnel
	// reconnects to it serving from the new root.
	update(map[string][]byte{"tls.crt": next.CertPEM, "tls.key": nextKey})
	t.Log("step 2: the new CA signs")
	time.Sleep(3 * time.Second)
	restartPod(ctx, t, "app=amesh-controller", "")

	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	r := <-res
	t.Logf("during the rotation: %d requests, %d OK, codes %v, errors %v", r.Requests, r.OK, r.Codes, r.Errors)
	if r.Requests < 1500 {
		t.Errorf("%d requests in 45s, want ≈ 2250 (50/s)", r.Requests)
	}
	if r.OK != r.Requests {
		t.Errorf("%d of %d requests failed during the rotation: codes %v, errors %v", r.Requests-r.OK, r.Requests, r.Codes, r.Errors)
	}

	// Workloads started now hold certificates of the new root; the first
	// two still hold theirs of the old root. Each kind reaches the other.
	client2 := mesh.Workload{Name: "client2", Role: "client", Node: shared.nodes[0]}
	server2 := mesh.Workload{Name: "server2", Service: true, Node: shared.nodes[1]}
	deploy(t, p.ns, client2, server2)
	if err := mesh.WaitRedirection(ctx, c, p.ns, "", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	d2 := driver(t, p.ns, client2)
	server2URL := fmt.Sprintf("http://server2.%s:%d/echo", p.ns, mesh.PortApp)
	expectReachable(ctx, t, d2, p.url("/echo"), true, time.Minute) // new root → old root
	expectReachable(ctx, t, d, server2URL, true, time.Minute)      // old root → new root
	expectReachable(ctx, t, d2, server2URL, true, time.Minute)     // new → new

	for _, w := range []struct {
		node, sa, keyID, root string
	}{
		{shared.nodes[0], "client", oldKeyID, "old"},
		{shared.nodes[1], "server", oldKeyID, "old"},
		{shared.nodes[0], "client2", newKeyID, "new"},
		{shared.nodes[1], "server2", newKeyID, "new"},
	} {
		got, err := ztunnelCertAuthority(ctx, w.node, mesh.Identity(p.ns, w.sa))
		if err != nil {
			t.Fatal(err)
		}
		if got != w.keyID {
			t.Errorf("%s's certificate on %s is signed by key %s, want the %s root's %s", w.sa, w.node, got, w.root, w.keyID)
		}
	}
}

// ztunnelDumpData is what the tests read of a ztunnel's config dump.
type ztunnelDumpData struct {
	TrustBundles map[string]struct {
		Roots []struct {
			SubjectKeyID string `json:"subjectKeyId"`
		} `json:"roots"`
	} `json:"trustBundles"`
	Certificates []struct {
		Identity       string `json:"identity"`
		State          string `json:"state"`
		AuthorityKeyID string `json:"authorityKeyId"`
	} `json:"certificates"`
}

// ztunnelDump reads the config dump of the ztunnel of node (its admin
// port, localhost only, through a port-forward).
func ztunnelDump(ctx context.Context, node string) (*ztunnelDumpData, error) {
	c := shared.c
	pods, err := c.Pods(ctx, mesh.SystemNamespace, "app=ztunnel")
	if err != nil {
		return nil, err
	}
	i := slices.IndexFunc(pods, func(p corev1.Pod) bool { return p.Spec.NodeName == node })
	if i < 0 {
		return nil, fmt.Errorf("no ztunnel on %s", node)
	}
	addr, stop, err := c.Forward(ctx, mesh.SystemNamespace, pods[i].Name, 15000)
	if err != nil {
		return nil, err
	}
	defer stop()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/config_dump", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("ztunnel %s config dump: %w", pods[i].Name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var d ztunnelDumpData
	if err := json.Unmarshal(body, &d); err != nil {
		return nil, fmt.Errorf("ztunnel %s config dump: %w", pods[i].Name, err)
	}
	return &d, nil
}

// ztunnelCertAuthority returns the authority key ID of the certificate the
// ztunnel of node holds for id.
func ztunnelCertAuthority(ctx context.Context, node, id string) (string, error) {
	d, err := ztunnelDump(ctx, node)
	if err != nil {
		return "", err
	}
	var have []string
	for _, ci := range d.Certificates {
		if ci.Identity == id && ci.State == "valid" {
			return ci.AuthorityKeyID, nil
		}
		have = append(have, ci.Identity+" ("+ci.State+")")
	}
	return "", fmt.Errorf("ztunnel on %s holds no valid certificate for %s; it holds %s", node, id, strings.Join(have, ", "))
}

// parseCerts parses the PEM certificates in b.
func parseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return out, nil
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
}
