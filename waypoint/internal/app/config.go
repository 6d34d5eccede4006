// Package app wires the waypoint together: identity and certificates from
// the controller's CA, discovery over delta xDS, the HBONE server feeding the
// tunnel server and L7 proxy, upstream HBONE connections, telemetry and the
// operational endpoints. Run returns after a graceful drain.
package app

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"time"

	"github.com/amesh-dev/amesh/waypoint/internal/proxy"
)

// Config is the waypoint's configuration.
type Config struct {
	// Identity of the waypoint: spiffe://<TrustDomain>/ns/<Namespace>/sa/<ServiceAccount>.
	TrustDomain    string
	Namespace      string
	ServiceAccount string
	// Pod, node and Gateway ("<namespace>/<name>") for xDS node metadata.
	PodName   string
	NodeName  string
	Gateway   string
	ClusterID string

	// ControllerAddr is the controller's discovery and CA address (host:15012).
	ControllerAddr string
	// ControllerServerName is the name verified in the controller's
	// certificate; default: the host of ControllerAddr.
	ControllerServerName string
	// RootCertFile holds the PEM roots that sign the controller's serving
	// certificate (the mesh root).
	RootCertFile string
	// TokenFile is the projected service-account token (audience "amesh"),
	// re-read for every call.
	TokenFile string

	HBONEAddr   string
	AdminAddr   string
	MetricsAddr string
	ReadyAddr   string

	// DrainTimeout bounds graceful shutdown.
	DrainTimeout time.Duration
	// AccessLog enables the access-log stream (stdout, JSON).
	AccessLog bool
	// OTLPEndpoint (host:port) enables span export over OTLP/gRPC.
	OTLPEndpoint  string
	OTLPInsecure  bool
	TraceSampling float64

	LogLevel string

	// UpstreamHBONEPort is the HBONE port of endpoints' ztunnels (15008).
	UpstreamHBONEPort uint16

	// RequestBodyIdleTimeout ends a request (408) whose client sent no body
	// bytes for this long while nothing was sent to it either; 0: none.
	RequestBodyIdleTimeout time.Duration
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		TrustDomain:   "cluster.local",
		HBONEAddr:     ":15008",
		AdminAddr:     "localhost:15000",
		MetricsAddr:   ":15020",
		ReadyAddr:     ":15021",
		DrainTimeout:  20 * time.Second,
		AccessLog:     true,
		TraceSampling: 0.01,
		LogLevel:      "info",

		RequestBodyIdleTimeout: proxy.DefaultRequestBodyIdleTimeout,
	}
}

// RegisterFlags binds the configuration to flags.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.TrustDomain, "trust-domain", c.TrustDomain, "SPIFFE trust domain")
	fs.StringVar(&c.Namespace, "namespace", c.Namespace, "namespace of the waypoint pod (identity)")
	fs.StringVar(&c.ServiceAccount, "service-account", c.ServiceAccount, "service account of the waypoint pod (identity)")
	fs.StringVar(&c.PodName, "pod-name", c.PodName, "pod name (xDS node id)")
	fs.StringVar(&c.NodeName, "node-name", c.NodeName, "node name")
	fs.StringVar(&c.Gateway, "gateway", c.Gateway, "the waypoint Gateway <namespace>/<name>")
	fs.StringVar(&c.ClusterID, "cluster-id", c.ClusterID, "cluster id for telemetry")
	fs.StringVar(&c.ControllerAddr, "controller", c.ControllerAddr, "controller address host:port (discovery and CA)")
	fs.StringVar(&c.ControllerServerName, "controller-server-name", c.ControllerServerName, "name expected in the controller certificate")
	fs.StringVar(&c.RootCertFile, "root-cert", c.RootCertFile, "PEM file with the mesh root certificates")
	fs.StringVar(&c.TokenFile, "token-file", c.TokenFile, "projected service-account token file (audience amesh)")
	fs.StringVar(&c.HBONEAddr, "hbone-addr", c.HBONEAddr, "HBONE listen address")
	fs.StringVar(&c.AdminAddr, "admin-addr", c.AdminAddr, "admin listen address (keep on localhost)")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", c.MetricsAddr, "Prometheus metrics listen address")
	fs.StringVar(&c.ReadyAddr, "ready-addr", c.ReadyAddr, "readiness listen address")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", c.DrainTimeout, "graceful drain bound")
	fs.BoolVar(&c.AccessLog, "access-log", c.AccessLog, "write access logs to stdout")
	fs.StringVar(&c.OTLPEndpoint, "otlp-endpoint", c.OTLPEndpoint, "OTLP/gRPC collector host:port for spans (empty: no export)")
	fs.BoolVar(&c.OTLPInsecure, "otlp-insecure", c.OTLPInsecure, "no TLS to the OTLP collector")
	fs.Float64Var(&c.TraceSampling, "trace-sampling", c.TraceSampling, "sampling ratio for new traces (0-1)")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.DurationVar(&c.RequestBodyIdleTimeout, "request-body-idle-timeout", c.RequestBodyIdleTimeout,
		"end a request (408) whose client sends no body bytes for this long while nothing is sent to it (0: never)")
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	need := func(v, name string) {
		if v == "" {
			errs = append(errs, fmt.Errorf("%s is required", name))
		}
	}
	need(c.TrustDomain, "trust domain")
	need(c.Namespace, "namespace")
	need(c.ServiceAccount, "service account")
	need(c.ControllerAddr, "controller address")
	need(c.RootCertFile, "root certificate file")
	need(c.TokenFile, "token file")
	need(c.Gateway, "gateway")
	for name, a := range map[string]string{"hbone": c.HBONEAddr, "admin": c.AdminAddr, "metrics": c.MetricsAddr, "ready": c.ReadyAddr, "controller": c.ControllerAddr} {
		if a == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			errs = append(errs, fmt.Errorf("%s address %q: %w", name, a, err))
		}
	}
	if c.DrainTimeout <= 0 {
		errs = append(errs, errors.New("drain timeout must be positive"))
	}
	if c.RequestBodyIdleTimeout < 0 {
		errs = append(errs, errors.New("request body idle timeout must not be negative"))
	}
	if c.TraceSampling < 0 || c.TraceSampling > 1 {
		errs = append(errs, fmt.Errorf("trace sampling %v is outside 0-1", c.TraceSampling))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log level %q is not debug, info, warn or error", c.LogLevel))
	}
	return errors.Join(errs...)
}
