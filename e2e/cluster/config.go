// Package cluster runs a local Kubernetes cluster on one Linux machine
// without a container engine: a real control plane (etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler) built from source, and N nodes,
// each a network namespace on a host bridge with its own root filesystem
// view, running kube-proxy, the amesh-node agent (which does the kubelet's
// job) and pods wired by the real CNI chain, plus CoreDNS as the cluster DNS.
// It is the amesh development and end-to-end test bed, not a production
// runtime. Everything it creates on the host carries a per-cluster name
// prefix, and Down removes exactly that, also after a crash.
package cluster

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"time"
)

// Config of a local cluster.
type Config struct {
	// Name identifies the cluster on the host: 1–8 of [a-z0-9], starting
	// with a letter. Host objects are named am-<name>…
	Name string `json:"name"`
	// StateDir holds certificates, data, logs and node roots; it defaults to
	// /var/lib/amesh-cluster/<name> and is removed by Down.
	StateDir string `json:"stateDir"`
	// Nodes is the number of nodes (1–50).
	Nodes int `json:"nodes"`

	// NodeCIDR is the bridge network: the host (control plane) takes its
	// first address, node i takes the (10+i)th.
	NodeCIDR netip.Prefix `json:"nodeCIDR"`
	// PodCIDR is split into one /24 per node (node i gets the i-th).
	PodCIDR netip.Prefix `json:"podCIDR"`
	// ServiceCIDR holds ClusterIPs; .1 is the kubernetes Service, .10 DNS.
	ServiceCIDR   netip.Prefix `json:"serviceCIDR"`
	ClusterDomain string       `json:"clusterDomain"`
	APIServerPort int          `json:"apiServerPort"`
	// ProxyMode is kube-proxy's mode: iptables or nftables.
	ProxyMode string `json:"proxyMode"`

	// KubeBinDir holds kube-apiserver, kube-controller-manager,
	// kube-scheduler, kube-proxy and etcd (`make -s print-kube-bin`).
	KubeBinDir string `json:"kubeBinDir"`
	// CoreDNS is the CoreDNS binary.
	CoreDNS string `json:"coreDNS"`
	// NodeBinary is the amesh-node binary.
	NodeBinary string `json:"nodeBinary"`
	// BinDir holds the repository's binaries for the image table (bin/).
	BinDir string `json:"binDir"`
	// ImagesFile is an optional image table whose entries come before the
	// built-in ones.
	ImagesFile string `json:"imagesFile,omitempty"`

	// ReadyTimeout bounds the start.
	ReadyTimeout time.Duration `json:"readyTimeout"`
	// RestartBackoff is the node agents' first crash-loop delay.
	RestartBackoff time.Duration `json:"restartBackoff"`
	// DNSReplicas is the number of CoreDNS pods.
	DNSReplicas int `json:"dnsReplicas"`
}

// DefaultStateRoot is where cluster state directories live by default.
const DefaultStateRoot = "/var/lib/amesh-cluster"

var nameRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,7}$`)

// Default fills unset fields.
func (c *Config) Default() {
	if c.Name == "" {
		c.Name = "amesh"
	}
	if c.StateDir == "" {
		c.StateDir = filepath.Join(DefaultStateRoot, c.Name)
	}
	if c.Nodes == 0 {
		c.Nodes = 2
	}
	if !c.NodeCIDR.IsValid() {
		c.NodeCIDR = netip.MustParsePrefix("172.30.0.0/24")
	}
	if !c.PodCIDR.IsValid() {
		c.PodCIDR = netip.MustParsePrefix("10.244.0.0/16")
	}
	if !c.ServiceCIDR.IsValid() {
		c.ServiceCIDR = netip.MustParsePrefix("10.96.0.0/16")
	}
	if c.ClusterDomain == "" {
		c.ClusterDomain = "cluster.local"
	}
	if c.APIServerPort == 0 {
		c.APIServerPort = 6443
	}
	if c.ProxyMode == "" {
		c.ProxyMode = "iptables"
	}
	if c.ReadyTimeout == 0 {
		c.ReadyTimeout = 5 * time.Minute
	}
	if c.RestartBackoff == 0 {
		c.RestartBackoff = 10 * time.Second
	}
	if c.DNSReplicas == 0 {
		c.DNSReplicas = 2
	}
}

// Validate checks the config (call Default first).
func (c *Config) Validate() error {
	var errs []error
	if !nameRE.MatchString(c.Name) {
		errs = append(errs, fmt.Errorf("name %q must be 1-8 of [a-z0-9] starting with a letter", c.Name))
	}
	if !filepath.IsAbs(c.StateDir) {
		errs = append(errs, fmt.Errorf("stateDir %q must be absolute", c.StateDir))
	}
	if c.Nodes < 1 || c.Nodes > 50 {
		errs = append(errs, fmt.Errorf("nodes %d must be between 1 and 50", c.Nodes))
	}
	for n, p := range map[string]netip.Prefix{"nodeCIDR": c.NodeCIDR, "podCIDR": c.PodCIDR, "serviceCIDR": c.ServiceCIDR} {
		if !p.Addr().Is4() || p != p.Masked() {
			errs = append(errs, fmt.Errorf("%s %s must be a masked IPv4 prefix", n, p))
		}
	}
	if c.NodeCIDR.Bits() > 26 {
		errs = append(errs, fmt.Errorf("nodeCIDR %s is too small (at most /26)", c.NodeCIDR))
	}
	if c.PodCIDR.Bits() > 23 || (c.PodCIDR.Bits() < 24 && c.Nodes >= 1<<(24-c.PodCIDR.Bits())) {
		errs = append(errs, fmt.Errorf("podCIDR %s cannot give %d nodes a /24 each", c.PodCIDR, c.Nodes))
	}
	if c.ServiceCIDR.Bits() > 24 {
		errs = append(errs, fmt.Errorf("serviceCIDR %s is too small (at most /24)", c.ServiceCIDR))
	}
	if c.NodeCIDR.Overlaps(c.PodCIDR) || c.NodeCIDR.Overlaps(c.ServiceCIDR) || c.PodCIDR.Overlaps(c.ServiceCIDR) {
		errs = append(errs, errors.New("nodeCIDR, podCIDR and serviceCIDR must not overlap"))
	}
	if c.ProxyMode != "iptables" && c.ProxyMode != "nftables" {
		errs = append(errs, fmt.Errorf("proxyMode %q must be iptables or nftables", c.ProxyMode))
	}
	if c.APIServerPort <= 0 || c.APIServerPort > 65535 {
		errs = append(errs, fmt.Errorf("apiServerPort %d out of range", c.APIServerPort))
	}
	for _, b := range []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "etcd"} {
		if err := executable(filepath.Join(c.KubeBinDir, b)); err != nil {
			errs = append(errs, fmt.Errorf("%w (build them with `make kube-bins`)", err))
		}
	}
	if err := executable(c.CoreDNS); err != nil {
		errs = append(errs, fmt.Errorf("%w (build it with `make coredns`)", err))
	}
	if err := executable(c.NodeBinary); err != nil {
		errs = append(errs, err)
	}
	if !filepath.IsAbs(c.BinDir) {
		errs = append(errs, fmt.Errorf("binDir %q must be absolute", c.BinDir))
	}
	if c.DNSReplicas < 1 {
		errs = append(errs, errors.New("dnsReplicas must be at least 1"))
	}
	if len(errs) > 0 {
		return fmt.Errorf("cluster config: %w", errors.Join(errs...))
	}
	return nil
}

func executable(p string) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("binary path %q must be absolute", p)
	}
	st, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("binary %s: %w", p, err)
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return fmt.Errorf("binary %s is not executable", p)
	}
	return nil
}

// Names and addresses derived from the config.

func (c *Config) prefix() string     { return "am-" + c.Name }
func (c *Config) bridge() string     { return c.prefix() }
func (c *Config) hostIP() netip.Addr { return c.NodeCIDR.Addr().Next() }

// NodeName is the Kubernetes name of node i (1-based).
func (c *Config) NodeName(i int) string { return c.Name + "-node" + strconv.Itoa(i) }

// NodeIP is node i's address.
func (c *Config) NodeIP(i int) netip.Addr {
	a := c.NodeCIDR.Addr()
	for range 10 + i {
		a = a.Next()
	}
	return a
}

// NodePodCIDR is node i's pod range.
func (c *Config) NodePodCIDR(i int) netip.Prefix {
	b := c.PodCIDR.Addr().As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += uint32(i) << 8
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), 0}), 24)
}

// NodeNetns is the name of node i's network namespace in /run/netns.
func (c *Config) NodeNetns(i int) string { return c.prefix() + "-node" + strconv.Itoa(i) }

func (c *Config) nodeVeth(i int) string { return c.prefix() + "-" + strconv.Itoa(i) }

func (c *Config) serviceIP(n int) netip.Addr {
	a := c.ServiceCIDR.Addr()
	for range n {
		a = a.Next()
	}
	return a
}

// DNSIP is the kube-dns Service address.
func (c *Config) DNSIP() netip.Addr { return c.serviceIP(10) }

// Kubeconfig is the admin kubeconfig's path.
func (c *Config) Kubeconfig() string { return filepath.Join(c.StateDir, "kubeconfig") }

// NodeDir is node i's directory on the host.
func (c *Config) NodeDir(i int) string { return filepath.Join(c.StateDir, "nodes", c.NodeName(i)) }

// NodeRootUpper is where writes to node i's root filesystem land (its
// hostPath volumes, installed CNI plugins, …) on the host.
func (c *Config) NodeRootUpper(i int) string { return filepath.Join(c.NodeDir(i), "rootfs", "upper") }
