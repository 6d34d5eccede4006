package cluster

import (
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/amesh-dev/amesh/e2e/internal/pki"
)

// pkiDir is where the control plane's certificates live.
func (c *Config) pkiDir() string { return filepath.Join(c.StateDir, "pki") }

func (c *Config) apiServerURL() string {
	return fmt.Sprintf("https://%s", net.JoinHostPort(c.hostIP().String(), fmt.Sprint(c.APIServerPort)))
}

// issuer is the service-account token issuer (and default audience).
func (c *Config) issuer() string { return "https://kubernetes.default.svc." + c.ClusterDomain }

// writePKI creates the cluster's CAs, certificates, signing key and
// kubeconfigs, kubeadm style.
func (c *Config) writePKI() error {
	dir := c.pkiDir()
	ca, err := pki.NewCA(c.Name + "-ca")
	if err != nil {
		return err
	}
	if err := ca.Write(dir, "ca"); err != nil {
		return err
	}
	etcdCA, err := pki.NewCA(c.Name + "-etcd-ca")
	if err != nil {
		return err
	}
	if err := etcdCA.Write(dir, "etcd-ca"); err != nil {
		return err
	}
	// The aggregation layer's front proxy (requestheader authentication).
	frontCA, err := pki.NewCA(c.Name + "-front-proxy-ca")
	if err != nil {
		return err
	}
	if err := frontCA.Write(dir, "front-proxy-ca"); err != nil {
		return err
	}
	if err := pki.WriteSigningKey(dir, "sa"); err != nil {
		return err
	}
	loop := net.ParseIP("127.0.0.1")
	host := net.IP(c.hostIP().AsSlice())
	apiSvc := net.IP(c.serviceIP(1).AsSlice())
	d := c.ClusterDomain
	issue := []struct {
		ca   *pki.CA
		name string
		req  pki.Request
	}{
		{ca, "apiserver", pki.Request{CommonName: "kube-apiserver", Usage: pki.Server,
			DNSNames: []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc." + d, "localhost"},
			IPs:      []net.IP{host, apiSvc, loop}}},
		{ca, "apiserver-kubelet-client", pki.Request{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"kubeadm:cluster-admins"}, Usage: pki.Client}},
		{etcdCA, "apiserver-etcd-client", pki.Request{CommonName: "kube-apiserver-etcd-client", Usage: pki.Client}},
		{etcdCA, "etcd-server", pki.Request{CommonName: "etcd", DNSNames: []string{"localhost"}, IPs: []net.IP{loop}, Usage: pki.Server | pki.Client}},
		{etcdCA, "etcd-healthcheck-client", pki.Request{CommonName: "kube-etcd-healthcheck-client", Usage: pki.Client}},
		{frontCA, "front-proxy-client", pki.Request{CommonName: "front-proxy-client", Usage: pki.Client}},
	}
	for _, i := range issue {
		p, err := i.ca.Issue(i.req)
		if err != nil {
			return err
		}
		if err := p.Write(dir, i.name); err != nil {
			return err
		}
	}
	kubeconfigs := []struct {
		file, user string
		req        pki.Request
	}{
		{c.Kubeconfig(), "kubernetes-admin", pki.Request{CommonName: "kubernetes-admin", Organization: []string{"system:masters"}, Usage: pki.Client}},
		{filepath.Join(c.StateDir, "controller-manager.kubeconfig"), "system:kube-controller-manager", pki.Request{CommonName: "system:kube-controller-manager", Usage: pki.Client}},
		{filepath.Join(c.StateDir, "scheduler.kubeconfig"), "system:kube-scheduler", pki.Request{CommonName: "system:kube-scheduler", Usage: pki.Client}},
	}
	for _, k := range kubeconfigs {
		if err := c.writeKubeconfig(ca, k.file, k.user, k.req); err != nil {
			return err
		}
	}
	for i := 1; i <= c.Nodes; i++ {
		if err := c.writeNodePKI(ca, i); err != nil {
			return err
		}
	}
	return nil
}

func (c *Config) writeKubeconfig(ca *pki.CA, file, user string, req pki.Request) error {
	p, err := ca.Issue(req)
	if err != nil {
		return err
	}
	return pki.Kubeconfig{Cluster: c.Name, Server: c.apiServerURL(), CAPEM: ca.CertPEM, User: user, Pair: p}.Write(file)
}

// nodeStateDir is node i's /var/lib/amesh-node on the host.
func (c *Config) nodeStateDir(i int) string { return filepath.Join(c.NodeDir(i), "state") }

func (c *Config) writeNodePKI(ca *pki.CA, i int) error {
	name := c.NodeName(i)
	st := c.nodeStateDir(i)
	if err := c.writeKubeconfig(ca, filepath.Join(st, "kubeconfig"), "system:node:"+name,
		pki.Request{CommonName: "system:node:" + name, Organization: []string{"system:nodes"}, Usage: pki.Client}); err != nil {
		return err
	}
	if err := c.writeKubeconfig(ca, filepath.Join(st, "kube-proxy.kubeconfig"), "system:kube-proxy",
		pki.Request{CommonName: "system:kube-proxy", Usage: pki.Client}); err != nil {
		return err
	}
	serving, err := ca.Issue(pki.Request{CommonName: name, DNSNames: []string{name}, IPs: []net.IP{net.IP(c.NodeIP(i).AsSlice())}, Usage: pki.Server})
	if err != nil {
		return err
	}
	if err := serving.Write(filepath.Join(st, "pki"), "kubelet"); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(st, "pki", "ca.crt"), ca.CertPEM, 0o644)
}
