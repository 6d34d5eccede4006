// Package app runs amesh-controller: the controller-runtime manager, the
// watch → translate → publish loop, delta xDS discovery and the certificate
// authority on one gRPC/TLS port, the leader-only writers (policy status,
// root certificate ConfigMaps), and metrics and health endpoints.
package app

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/amesh-dev/amesh/controller/internal/deployer"
	"github.com/amesh-dev/amesh/controller/internal/label"
)

// Config is amesh-controller's configuration.
type Config struct {
	// Kubeconfig path; empty: $KUBECONFIG, in-cluster, ~/.kube/config.
	Kubeconfig string
	// Namespace the controller runs in; it holds the CA Secret, the
	// leader-election Lease, mesh-wide policies and the ztunnel.
	Namespace string
	// TrustDomain of mesh identities.
	TrustDomain string
	// ClusterDomain is the cluster's DNS suffix.
	ClusterDomain string
	// ClusterID names this cluster in workloads.
	ClusterID string

	// GRPCAddr serves discovery (delta xDS) and certificates over TLS.
	GRPCAddr string
	// MetricsAddr serves /metrics, /healthz and /readyz.
	MetricsAddr string
	// ServiceName is the controller's Service; the serving certificate
	// names it (<svc>.<ns>.svc and longer forms) plus ExtraDNSNames.
	ServiceName   string
	ExtraDNSNames []string

	// CASecret is the Secret (in Namespace) holding the mesh CA; created
	// with a new root when absent.
	CASecret string
	// RootCertConfigMap is the ConfigMap written to every enrolled
	// namespace with the mesh roots.
	RootCertConfigMap string
	// TokenAudience is the audience of the data plane's projected tokens.
	TokenAudience string
	// ZtunnelServiceAccount (in Namespace) is the ztunnel's identity.
	ZtunnelServiceAccount string
	// WaypointClass is the GatewayClass of waypoints.
	WaypointClass string

	// LeaderElection guards the writers (status, ConfigMaps); every
	// replica serves discovery and certificates.
	LeaderElection   bool
	LeaderElectionID string

	// CertTTL caps workload certificates; RootTTL is the lifetime of a
	// generated root; ServingCertTTL of the controller's own certificate.
	CertTTL        time.Duration
	RootTTL        time.Duration
	ServingCertTTL time.Duration
	// Debounce and MaxDebounce shape how changes are batched into pushes.
	Debounce    time.Duration
	MaxDebounce time.Duration
	// TokenCacheTTL bounds how long a token review is reused.
	TokenCacheTTL time.Duration
	// ShutdownTimeout bounds the graceful stop of the servers.
	ShutdownTimeout time.Duration

	// DeployWaypoints runs the waypoint deployer (leader only): each
	// Gateway of WaypointClass becomes a ServiceAccount, Deployment and
	// Service.
	DeployWaypoints bool
	// WaypointController is the controller's address as waypoints dial it
	// (host:port); empty: <ServiceName>.<Namespace>.svc and the port of
	// GRPCAddr.
	WaypointController string
	// Waypoint holds the deployer's waypoint-only settings (image,
	// resources, drain); the settings it shares with the controller (trust
	// domain, cluster domain and ID, class, root ConfigMap, token audience,
	// controller address) are taken from the fields above.
	Waypoint deployer.Options
}

// Default returns the production defaults (DESIGN.md §2, §3).
func Default() Config {
	return Config{
		Namespace:             label.SystemNamespace,
		TrustDomain:           "cluster.local",
		ClusterDomain:         "cluster.local",
		ClusterID:             "Kubernetes",
		GRPCAddr:              ":15012",
		MetricsAddr:           ":15014",
		ServiceName:           "amesh-controller",
		CASecret:              "amesh-ca",
		RootCertConfigMap:     label.RootCertConfigMap,
		TokenAudience:         "amesh",
		ZtunnelServiceAccount: "ztunnel",
		WaypointClass:         label.WaypointClass,
		LeaderElection:        true,
		LeaderElectionID:      "amesh-controller",
		CertTTL:               24 * time.Hour,
		RootTTL:               10 * 365 * 24 * time.Hour,
		ServingCertTTL:        24 * time.Hour,
		Debounce:              10 * time.Millisecond,
		MaxDebounce:           100 * time.Millisecond,
		TokenCacheTTL:         time.Minute,
		ShutdownTimeout:       10 * time.Second,
		DeployWaypoints:       true,
		Waypoint:              deployer.DefaultOptions(),
	}
}

// ApplyEnv takes settings from the environment before flags override them:
// WAYPOINT_IMAGE (the manifests set it) is the waypoint image.
func (c *Config) ApplyEnv(getenv func(string) string) {
	if v := getenv("WAYPOINT_IMAGE"); v != "" {
		c.Waypoint.Image = v
	}
}

// waypointOptions are the deployer's options: the waypoint-only settings
// with the shared ones filled in from the controller's own.
func (c Config) waypointOptions() deployer.Options {
	o := c.Waypoint
	o.Class = c.WaypointClass
	o.TrustDomain = c.TrustDomain
	o.ClusterDomain = c.ClusterDomain
	o.ClusterID = c.ClusterID
	o.RootCertConfigMap = c.RootCertConfigMap
	o.TokenAudience = c.TokenAudience
	svc := c.ServiceName + "." + c.Namespace + ".svc"
	o.Controller = c.WaypointController
	if o.Controller == "" {
		port := "15012"
		if _, p, err := net.SplitHostPort(c.GRPCAddr); err == nil && p != "" && p != "0" {
			port = p
		}
		o.Controller = net.JoinHostPort(svc, port)
	}
	if o.ControllerServerName == "" {
		// The serving certificate always names <svc>.<ns>.svc.
		o.ControllerServerName = svc
	}
	return o
}

// AddFlags binds the configuration to command-line flags.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Kubeconfig, "kubeconfig", c.Kubeconfig, "path to a kubeconfig (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
	fs.StringVar(&c.Namespace, "namespace", c.Namespace, "namespace of the controller, the CA Secret, mesh-wide policies and ztunnel")
	fs.StringVar(&c.TrustDomain, "trust-domain", c.TrustDomain, "SPIFFE trust domain of mesh identities")
	fs.StringVar(&c.ClusterDomain, "cluster-domain", c.ClusterDomain, "DNS suffix of the cluster")
	fs.StringVar(&c.ClusterID, "cluster-id", c.ClusterID, "name of this cluster in workload resources")
	fs.StringVar(&c.GRPCAddr, "grpc-addr", c.GRPCAddr, "address of the discovery and certificate gRPC/TLS server")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", c.MetricsAddr, "address of /metrics, /healthz and /readyz")
	fs.StringVar(&c.ServiceName, "service-name", c.ServiceName, "the controller's Service name (for its serving certificate)")
	fs.Func("extra-dns-name", "additional DNS name in the serving certificate (repeatable)", func(s string) error {
		c.ExtraDNSNames = append(c.ExtraDNSNames, s)
		return nil
	})
	fs.StringVar(&c.CASecret, "ca-secret", c.CASecret, "Secret holding the mesh CA (created with a new root when absent)")
	fs.StringVar(&c.RootCertConfigMap, "root-cert-configmap", c.RootCertConfigMap, "ConfigMap receiving the mesh roots in enrolled namespaces")
	fs.StringVar(&c.TokenAudience, "token-audience", c.TokenAudience, "audience of the data plane's service-account tokens")
	fs.StringVar(&c.ZtunnelServiceAccount, "ztunnel-service-account", c.ZtunnelServiceAccount, "service account of ztunnel (in --namespace)")
	fs.StringVar(&c.WaypointClass, "waypoint-class", c.WaypointClass, "GatewayClass of waypoints")
	fs.BoolVar(&c.LeaderElection, "leader-elect", c.LeaderElection, "elect a leader for the writers (status, ConfigMaps)")
	fs.StringVar(&c.LeaderElectionID, "leader-election-id", c.LeaderElectionID, "name of the leader-election Lease")
	fs.DurationVar(&c.CertTTL, "cert-ttl", c.CertTTL, "maximum lifetime of workload certificates")
	fs.DurationVar(&c.RootTTL, "root-ttl", c.RootTTL, "lifetime of a generated root")
	fs.DurationVar(&c.ServingCertTTL, "serving-cert-ttl", c.ServingCertTTL, "lifetime of the controller's serving certificate")
	fs.DurationVar(&c.Debounce, "debounce", c.Debounce, "quiet time after a change before translating")
	fs.DurationVar(&c.MaxDebounce, "max-debounce", c.MaxDebounce, "longest a burst of changes may delay a translation")
	fs.DurationVar(&c.TokenCacheTTL, "token-cache-ttl", c.TokenCacheTTL, "how long a token review is reused")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", c.ShutdownTimeout, "graceful stop deadline")
	fs.BoolVar(&c.DeployWaypoints, "deploy-waypoints", c.DeployWaypoints, "deploy a waypoint for each Gateway of the waypoint class (leader only)")
	fs.StringVar(&c.WaypointController, "waypoint-controller-address", c.WaypointController,
		"the controller's address as waypoints dial it (default <service-name>.<namespace>.svc:<grpc port>)")
	c.Waypoint.AddFlags(fs)
}

// Validate reports every invalid setting.
func (c Config) Validate() error {
	var errs []error
	dns1123 := func(name, v string) {
		if msgs := validation.IsDNS1123Label(v); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("%s %q: %s", name, v, strings.Join(msgs, "; ")))
		}
	}
	dns1123("namespace", c.Namespace)
	dns1123("service name", c.ServiceName)
	dns1123("ztunnel service account", c.ZtunnelServiceAccount)
	for _, f := range []struct{ name, v string }{
		{"CA secret", c.CASecret}, {"root cert ConfigMap", c.RootCertConfigMap},
		{"leader election id", c.LeaderElectionID}, {"waypoint class", c.WaypointClass},
	} {
		if msgs := validation.IsDNS1123Subdomain(f.v); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("%s %q: %s", f.name, f.v, strings.Join(msgs, "; ")))
		}
	}
	if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
		errs = append(errs, fmt.Errorf("trust domain %q: %w", c.TrustDomain, err))
	}
	if msgs := validation.IsDNS1123Subdomain(c.ClusterDomain); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("cluster domain %q: %s", c.ClusterDomain, strings.Join(msgs, "; ")))
	}
	if c.ClusterID == "" {
		errs = append(errs, errors.New("cluster id is empty"))
	}
	for _, f := range []struct{ name, v string }{{"grpc address", c.GRPCAddr}, {"metrics address", c.MetricsAddr}} {
		if _, _, err := net.SplitHostPort(f.v); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", f.name, f.v, err))
		}
	}
	for _, n := range c.ExtraDNSNames {
		if msgs := validation.IsDNS1123Subdomain(n); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("extra DNS name %q: %s", n, strings.Join(msgs, "; ")))
		}
	}
	if c.TokenAudience == "" {
		errs = append(errs, errors.New("token audience is empty"))
	}
	for _, f := range []struct {
		name string
		d    time.Duration
	}{
		{"cert ttl", c.CertTTL}, {"root ttl", c.RootTTL}, {"serving cert ttl", c.ServingCertTTL},
		{"debounce", c.Debounce}, {"max debounce", c.MaxDebounce}, {"token cache ttl", c.TokenCacheTTL},
		{"shutdown timeout", c.ShutdownTimeout},
	} {
		if f.d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %v", f.name, f.d))
		}
	}
	if c.MaxDebounce < c.Debounce {
		errs = append(errs, fmt.Errorf("max debounce %v is shorter than debounce %v", c.MaxDebounce, c.Debounce))
	}
	if c.RootTTL <= c.CertTTL {
		errs = append(errs, fmt.Errorf("root ttl %v must exceed cert ttl %v", c.RootTTL, c.CertTTL))
	}
	if c.DeployWaypoints {
		if err := c.waypointOptions().Validate(); err != nil {
			errs = append(errs, fmt.Errorf("waypoint deployer: %w", err))
		}
	}
	return errors.Join(errs...)
}

// dnsNames are the names in the serving certificate.
func (c Config) dnsNames() []string {
	svc, ns := c.ServiceName, c.Namespace
	return append([]string{
		svc + "." + ns + ".svc",
		svc + "." + ns + ".svc." + c.ClusterDomain,
		svc + "." + ns,
		svc,
	}, c.ExtraDNSNames...)
}
