package cluster

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func validConfig(t *testing.T) Config {
	dir := t.TempDir()
	for _, b := range []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "etcd", "coredns", "amesh-node"} {
		if err := os.WriteFile(filepath.Join(dir, b), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c := Config{KubeBinDir: dir, CoreDNS: filepath.Join(dir, "coredns"), NodeBinary: filepath.Join(dir, "amesh-node"), BinDir: dir}
	c.Default()
	return c
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Config)
		want   string // substring of the error; "" means valid
	}{
		{"defaults", func(*Config) {}, ""},
		{"name with dash", func(c *Config) { c.Name = "my-dev" }, "name"},
		{"name too long", func(c *Config) { c.Name = "abcdefghi" }, "name"},
		{"no nodes", func(c *Config) { c.Nodes = 0 }, "nodes"},
		{"too many nodes for the pod CIDR", func(c *Config) { c.PodCIDR = netip.MustParsePrefix("10.1.0.0/22"); c.Nodes = 4 }, "podCIDR"},
		{"overlap", func(c *Config) { c.PodCIDR = netip.MustParsePrefix("10.96.0.0/16") }, "overlap"},
		{"unmasked", func(c *Config) { c.NodeCIDR = netip.MustParsePrefix("172.30.0.1/24") }, "masked"},
		{"ipv6", func(c *Config) { c.ServiceCIDR = netip.MustParsePrefix("fd00::/108") }, "IPv4"},
		{"proxy mode", func(c *Config) { c.ProxyMode = "ipvs" }, "proxyMode"},
		{"missing kube binaries", func(c *Config) { c.KubeBinDir = "/nonexistent" }, "make kube-bins"},
		{"relative state dir", func(c *Config) { c.StateDir = "state" }, "stateDir"},
	}
	for _, tt := range tests {
		c := validConfig(t)
		tt.mutate(&c)
		err := c.Validate()
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("%s: unexpected error %v", tt.name, err)
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("%s: error %v, want one mentioning %q", tt.name, err, tt.want)
		}
	}
}

func TestAddressing(t *testing.T) {
	c := validConfig(t)
	c.NodeCIDR = netip.MustParsePrefix("172.30.5.0/24")
	c.PodCIDR = netip.MustParsePrefix("10.50.0.0/16")
	if got := c.hostIP().String(); got != "172.30.5.1" {
		t.Errorf("host IP %s", got)
	}
	if got := c.NodeIP(2).String(); got != "172.30.5.12" {
		t.Errorf("node 2 IP %s", got)
	}
	if got := c.NodePodCIDR(3).String(); got != "10.50.3.0/24" {
		t.Errorf("node 3 pod CIDR %s", got)
	}
	if got := c.DNSIP().String(); got != "10.96.0.10" {
		t.Errorf("DNS IP %s", got)
	}
	for i := 1; i <= 50; i++ {
		for _, n := range []string{c.NodeNetns(i), c.nodeVeth(i), c.bridge()} {
			if len(n) > 15 && n != c.NodeNetns(i) {
				t.Errorf("interface name %q longer than 15 bytes", n)
			}
			if !strings.HasPrefix(n, c.prefix()) {
				t.Errorf("host object %q lacks the cluster prefix", n)
			}
		}
	}
	c.Name = "abcdefgh"
	if n := c.nodeVeth(50); len(n) > 15 {
		t.Errorf("longest veth name %q exceeds 15 bytes", n)
	}
}
