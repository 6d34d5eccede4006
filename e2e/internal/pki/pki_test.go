package pki

import (
	"crypto/x509"
	"encoding/pem"
	"net"
	"path/filepath"
	"testing"

	"k8s.io/client-go/tools/clientcmd"
)

func TestIssueAndLoad(t *testing.T) {
	ca, err := NewCA("test-ca")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := ca.Write(dir, "ca"); err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadCA(dir, "ca")
	if err != nil {
		t.Fatal(err)
	}
	p, err := loaded.Issue(Request{CommonName: "system:node:n1", Organization: []string{"system:nodes"}, DNSNames: []string{"n1"}, IPs: []net.IP{net.ParseIP("10.0.0.1")}, Usage: Client | Server})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(p.CertPEM)
	cert, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{usage}, DNSName: "n1"}); err != nil {
			t.Errorf("verify for %v: %v", usage, err)
		}
	}
	if cert.Subject.CommonName != "system:node:n1" || cert.Subject.Organization[0] != "system:nodes" {
		t.Errorf("subject %v", cert.Subject)
	}
	other, _ := NewCA("other")
	bad := x509.NewCertPool()
	bad.AddCert(other.Cert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: bad, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
		t.Error("certificate verified against an unrelated CA")
	}
	if _, err := ca.Issue(Request{CommonName: "x"}); err == nil {
		t.Error("issued a certificate without a usage")
	}
	kc := filepath.Join(dir, "kubeconfig")
	if err := (Kubeconfig{Cluster: "c", Server: "https://10.0.0.1:6443", CAPEM: ca.CertPEM, User: "u", Pair: p}).Write(kc); err != nil {
		t.Fatal(err)
	}
	rc, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil || rc.Host != "https://10.0.0.1:6443" || len(rc.TLSClientConfig.CertData) == 0 {
		t.Errorf("kubeconfig round trip: %+v, %v", rc, err)
	}
	if err := WriteSigningKey(dir, "sa"); err != nil {
		t.Fatal(err)
	}
}
