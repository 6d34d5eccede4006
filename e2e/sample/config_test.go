package sample

import (
	"flag"
	"strings"
	"testing"
	"time"
)

func TestConfigFlagsAndEnv(t *testing.T) {
	t.Setenv("ROLE", "reviews")
	t.Setenv("VERSION", "v2")
	t.Setenv("POD_NAME", "reviews-v2-abc")
	t.Setenv("POD_NAMESPACE", "bookinfo")
	t.Setenv("FAIL", "1/3")
	t.Setenv("DELAY", "15ms")
	t.Setenv("UPSTREAM_TIMEOUT", "2s")
	t.Setenv("ACCESS_LOG", "true")
	cfg := Default()
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	cfg.RegisterFlags(fs)
	// Flags win over the environment.
	if err := fs.Parse([]string{"-ratings-addr", "ratings.bookinfo:9080", "-fail-code", "500", "-version", "v3"}); err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	want := ServedBy{Service: "reviews", Version: "v3", Pod: "reviews-v2-abc", Namespace: "bookinfo"}
	if got := cfg.servedBy(); got != want {
		t.Errorf("servedBy = %+v, want %+v", got, want)
	}
	if cfg.Fault != (Fault{Fail: FailSpec{K: 1, N: 3}, Code: 500, Delay: 15 * time.Millisecond}) {
		t.Errorf("fault = %+v", cfg.Fault)
	}
	if cfg.RatingsAddr != "ratings.bookinfo:9080" || cfg.UpstreamTimeout != 2*time.Second || !cfg.AccessLog {
		t.Errorf("config = %+v", cfg)
	}
}

func TestConfigBadEnvIsReported(t *testing.T) {
	t.Setenv("ROLE", "details")
	t.Setenv("DELAY", "a while")
	t.Setenv("FAIL", "lots")
	t.Setenv("DRAIN_TIMEOUT", "x")
	cfg := Default()
	cfg.RegisterFlags(flag.NewFlagSet("t", flag.ContinueOnError))
	err := cfg.Validate()
	if err == nil {
		t.Fatal("Validate accepted malformed environment values")
	}
	for _, want := range []string{"DELAY", "FAIL", "DRAIN_TIMEOUT"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	ok := func(role Role) Config {
		c := Default()
		c.Role = role
		c.Pod = "p"
		return c
	}
	tests := []struct {
		name    string
		mutate  func(*Config)
		wantErr string
	}{
		{name: "productpage", mutate: func(c *Config) { *c = ok(RoleProductPage) }},
		{name: "ratings", mutate: func(c *Config) { *c = ok(RoleRatings); c.Fault.Code = 14 }},
		{name: "client", mutate: func(c *Config) { *c = ok(RoleClient) }},
		{name: "no role", mutate: func(c *Config) { *c = ok("") }, wantErr: "role"},
		{name: "unknown role", mutate: func(c *Config) { *c = ok("frontend") }, wantErr: "role"},
		{name: "no pod", mutate: func(c *Config) { *c = ok(RoleDetails); c.Pod = "" }, wantErr: "pod"},
		{name: "bad listen", mutate: func(c *Config) { *c = ok(RoleDetails); c.Listen = "9080" }, wantErr: "listen"},
		{name: "bad details url", mutate: func(c *Config) { *c = ok(RoleProductPage); c.DetailsURL = "details:9080" }, wantErr: "details-url"},
		{name: "v1 needs no ratings", mutate: func(c *Config) { *c = ok(RoleReviews); c.RatingsAddr = "" }},
		{name: "v2 needs ratings", mutate: func(c *Config) { *c = ok(RoleReviews); c.Version = "v2"; c.RatingsAddr = "" }, wantErr: "ratings-addr"},
		{name: "http code on ratings", mutate: func(c *Config) { *c = ok(RoleRatings); c.Fault.Code = 503 }, wantErr: "gRPC code"},
		{name: "grpc code on details", mutate: func(c *Config) { *c = ok(RoleDetails); c.Fault.Code = 14 }, wantErr: "HTTP status"},
		{name: "delay too long", mutate: func(c *Config) { *c = ok(RoleDetails); c.Fault.Delay = time.Hour }, wantErr: "delay"},
		{name: "no timeout", mutate: func(c *Config) { *c = ok(RoleDetails); c.UpstreamTimeout = 0 }, wantErr: "upstream-timeout"},
		{name: "log level", mutate: func(c *Config) { *c = ok(RoleDetails); c.LogLevel = "loud" }, wantErr: "log-level"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var c Config
			tt.mutate(&c)
			err := c.Validate()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("Validate = %v, want an error about %q", err, tt.wantErr)
			}
		})
	}
}
