package config

import (
	"flag"
	"strings"
	"testing"
	"time"
)

func TestDefaultsNeedOnlyTheNode(t *testing.T) {
	c := Default()
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "node-name is required") {
		t.Fatalf("Validate() = %v, want node-name is required", err)
	}
	c.NodeName = "node1"
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate() = %v", err)
	}
}

func TestFlags(t *testing.T) {
	t.Setenv("NODE_NAME", "from-env")
	c := Default()
	fs := flag.NewFlagSet("ztunnel", flag.ContinueOnError)
	c.RegisterFlags(fs)
	if c.NodeName != "from-env" {
		t.Fatalf("NODE_NAME not used: %q", c.NodeName)
	}
	if err := fs.Parse([]string{"-controller", "10.0.0.1:15012", "-drain-timeout", "3s", "-admin-addr", ""}); err != nil {
		t.Fatal(err)
	}
	if c.Controller != "10.0.0.1:15012" || c.DrainTimeout != 3*time.Second || c.AdminAddr != "" {
		t.Fatalf("flags not applied: %+v", c)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"controller without port", func(c *Config) { c.Controller = "ctl" }, "controller"},
		{"bad trust domain", func(c *Config) { c.TrustDomain = "Not Valid" }, "trust-domain"},
		{"bad metrics port", func(c *Config) { c.MetricsAddr = ":99999" }, "metrics-addr"},
		{"bad ready addr", func(c *Config) { c.ReadyAddr = "nope" }, "ready-addr"},
		{"short ttl", func(c *Config) { c.CertTTL = time.Minute }, "cert-ttl"},
		{"zero connect timeout", func(c *Config) { c.ConnectTimeout = 0 }, "connect-timeout"},
		{"negative drain", func(c *Config) { c.DrainTimeout = -time.Second }, "drain-timeout"},
		{"bad log level", func(c *Config) { c.LogLevel = "loud" }, "log-level"},
		{"no token", func(c *Config) { c.TokenFile = "" }, "token-file"},
		{"no socket", func(c *Config) { c.ZDSSocket = "" }, "zds-socket"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Default()
			c.NodeName = "n"
			tt.mutate(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want an error about %s", err, tt.want)
			}
		})
	}
}
