// Package config is ztunnel's typed configuration: defaults, command-line
// flags (with environment fallbacks for the values Kubernetes injects) and
// validation.
package config

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Config is everything ztunnel needs to run.
type Config struct {
	// Controller is the controller's discovery and CA address (host:port).
	Controller string
	// ControllerName is the TLS server name of the controller.
	ControllerName string
	// RootCertFile holds the PEM mesh roots: they verify the controller
	// and seed the trust bundle until discovery publishes it.
	RootCertFile string
	// TokenFile is ztunnel's projected service-account token (audience
	// "amesh"), re-read for every call.
	TokenFile string
	// ZDSSocket is the node agent's socket.
	ZDSSocket string
	// NodeName, PodName, PodNamespace identify this ztunnel.
	NodeName, PodName, PodNamespace string
	// TrustDomain of the mesh.
	TrustDomain string
	// ClusterID labels telemetry.
	ClusterID string

	AdminAddr   string
	MetricsAddr string
	ReadyAddr   string

	// CertTTL is the requested workload certificate lifetime.
	CertTTL time.Duration
	// ConnectTimeout bounds every upstream connect.
	ConnectTimeout time.Duration
	// DrainTimeout bounds the drain of a removed pod and of shutdown.
	DrainTimeout time.Duration

	LogLevel  string
	AccessLog bool
}

// Default returns the defaults.
func Default() Config {
	return Config{
		Controller:     "amesh-controller.amesh-system.svc:15012",
		ControllerName: "amesh-controller.amesh-system.svc",
		RootCertFile:   "/var/run/secrets/amesh/root-cert.pem",
		TokenFile:      "/var/run/secrets/tokens/amesh-token",
		ZDSSocket:      "/var/run/amesh/zds.sock",
		TrustDomain:    "cluster.local",
		ClusterID:      "Kubernetes",
		AdminAddr:      "127.0.0.1:15000",
		MetricsAddr:    ":15020",
		ReadyAddr:      ":15021",
		CertTTL:        24 * time.Hour,
		ConnectTimeout: 5 * time.Second,
		DrainTimeout:   20 * time.Second,
		LogLevel:       "info",
		AccessLog:      true,
	}
}

func env(name, def string) string {
	if v, ok := os.LookupEnv(name); ok && v != "" {
		return v
	}
	return def
}

// RegisterFlags binds the configuration to fs. Environment variables
// NODE_NAME, POD_NAME and POD_NAMESPACE give the defaults of the identity
// flags.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Controller, "controller", c.Controller, "controller discovery and CA address (host:port)")
	fs.StringVar(&c.ControllerName, "controller-name", c.ControllerName, "TLS server name of the controller")
	fs.StringVar(&c.RootCertFile, "root-cert", c.RootCertFile, "PEM file with the mesh root certificates")
	fs.StringVar(&c.TokenFile, "token-file", c.TokenFile, "projected service-account token (audience amesh)")
	fs.StringVar(&c.ZDSSocket, "zds-socket", c.ZDSSocket, "node agent ZDS socket")
	fs.StringVar(&c.NodeName, "node-name", env("NODE_NAME", c.NodeName), "name of this node")
	fs.StringVar(&c.PodName, "pod-name", env("POD_NAME", c.PodName), "name of this ztunnel pod")
	fs.StringVar(&c.PodNamespace, "pod-namespace", env("POD_NAMESPACE", c.PodNamespace), "namespace of this ztunnel pod")
	fs.StringVar(&c.TrustDomain, "trust-domain", c.TrustDomain, "mesh trust domain")
	fs.StringVar(&c.ClusterID, "cluster-id", c.ClusterID, "cluster name for telemetry")
	fs.StringVar(&c.AdminAddr, "admin-addr", c.AdminAddr, "admin address (config dump, pprof); empty disables")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", c.MetricsAddr, "Prometheus metrics address; empty disables")
	fs.StringVar(&c.ReadyAddr, "ready-addr", c.ReadyAddr, "readiness address; empty disables")
	fs.DurationVar(&c.CertTTL, "cert-ttl", c.CertTTL, "requested workload certificate lifetime")
	fs.DurationVar(&c.ConnectTimeout, "connect-timeout", c.ConnectTimeout, "upstream connect timeout")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", c.DrainTimeout, "drain deadline for removed pods and shutdown")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.BoolVar(&c.AccessLog, "access-log", c.AccessLog, "log one line per connection")
}

// Validate reports every invalid setting.
func (c *Config) Validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(c.Controller); err != nil {
		errs = append(errs, fmt.Errorf("controller %q: %w", c.Controller, err))
	}
	for name, v := range map[string]string{
		"root-cert": c.RootCertFile, "token-file": c.TokenFile, "zds-socket": c.ZDSSocket,
		"node-name": c.NodeName, "controller-name": c.ControllerName,
	} {
		if v == "" {
			errs = append(errs, fmt.Errorf("%s is required", name))
		}
	}
	if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
		errs = append(errs, fmt.Errorf("trust-domain %q: %w", c.TrustDomain, err))
	}
	for name, v := range map[string]string{"admin-addr": c.AdminAddr, "metrics-addr": c.MetricsAddr, "ready-addr": c.ReadyAddr} {
		if v == "" {
			continue
		}
		if _, p, err := net.SplitHostPort(v); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", name, v, err))
		} else if n, err := strconv.Atoi(p); err != nil || n < 0 || n > 65535 {
			errs = append(errs, fmt.Errorf("%s %q: bad port", name, v))
		}
	}
	if c.CertTTL < 10*time.Minute {
		errs = append(errs, fmt.Errorf("cert-ttl %s is shorter than 10m", c.CertTTL))
	}
	if c.ConnectTimeout <= 0 {
		errs = append(errs, errors.New("connect-timeout must be positive"))
	}
	if c.DrainTimeout < 0 {
		errs = append(errs, errors.New("drain-timeout must not be negative"))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log-level %q: want debug, info, warn or error", c.LogLevel))
	}
	return errors.Join(errs...)
}
