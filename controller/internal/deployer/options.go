package deployer

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/amesh-dev/amesh/controller/internal/label"
)

// Options configures the waypoint deployer. The controller fills the
// fields it shares with the rest of amesh-controller (trust domain, cluster
// domain and ID, its own address, root ConfigMap, token audience, class)
// from its own configuration; AddFlags binds the waypoint-only ones.
type Options struct {
	// Class is the GatewayClass of waypoints and ControllerName the
	// controllerName a GatewayClass must carry to be served.
	Class          string
	ControllerName string

	// Image is the waypoint container image.
	Image           string
	ImagePullPolicy corev1.PullPolicy
	// Resources of the waypoint container.
	CPURequest    resource.Quantity
	MemoryRequest resource.Quantity
	MemoryLimit   resource.Quantity
	// DrainTimeout is the waypoint's graceful drain bound; the pod's
	// termination grace period leaves ten more seconds.
	DrainTimeout time.Duration

	// Controller is the address (host:port) of amesh-controller's
	// discovery and certificate server, ControllerServerName the name the
	// waypoint verifies in its certificate (default: the host).
	Controller           string
	ControllerServerName string
	TrustDomain          string
	ClusterDomain        string
	ClusterID            string
	// RootCertConfigMap is the ConfigMap with the mesh roots
	// (key root-cert.pem) in the waypoint's namespace.
	RootCertConfigMap string
	// TokenAudience of the projected service-account token the waypoint
	// presents to the controller.
	TokenAudience string

	// FieldOwner is the server-side apply field manager.
	FieldOwner string
	// BlockedRetry is how often a waypoint blocked by an object of the
	// same name that it does not own is checked again (such objects are
	// not watched).
	BlockedRetry time.Duration
}

// DefaultOptions returns the defaults (DESIGN.md §2, §3).
func DefaultOptions() Options {
	return Options{
		Class:                label.WaypointClass,
		ControllerName:       label.WaypointController,
		Image:                "ghcr.io/amesh-dev/waypoint:latest",
		ImagePullPolicy:      corev1.PullIfNotPresent,
		CPURequest:           resource.MustParse("100m"),
		MemoryRequest:        resource.MustParse("128Mi"),
		MemoryLimit:          resource.MustParse("1Gi"),
		DrainTimeout:         20 * time.Second,
		Controller:           "amesh-controller." + label.SystemNamespace + ".svc:15012",
		ControllerServerName: "",
		TrustDomain:          "cluster.local",
		ClusterDomain:        "cluster.local",
		ClusterID:            "Kubernetes",
		RootCertConfigMap:    label.RootCertConfigMap,
		TokenAudience:        "amesh",
		FieldOwner:           "amesh-waypoint-deployer",
		BlockedRetry:         10 * time.Second,
	}
}

// AddFlags binds the waypoint-only settings to flags named -waypoint-….
func (o *Options) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.Image, "waypoint-image", o.Image, "container image of the waypoints the controller deploys")
	fs.Func("waypoint-image-pull-policy", "pull policy of the waypoint image: Always, IfNotPresent or Never (default "+string(o.ImagePullPolicy)+")",
		func(s string) error {
			o.ImagePullPolicy = corev1.PullPolicy(s)
			return nil
		})
	quantity := func(name, usage string, q *resource.Quantity) {
		fs.Func(name, usage+" (default "+q.String()+")", func(s string) error {
			v, err := resource.ParseQuantity(s)
			if err != nil {
				return err
			}
			*q = v
			return nil
		})
	}
	quantity("waypoint-cpu-request", "CPU request of a waypoint", &o.CPURequest)
	quantity("waypoint-memory-request", "memory request of a waypoint", &o.MemoryRequest)
	quantity("waypoint-memory-limit", "memory limit of a waypoint (0: none)", &o.MemoryLimit)
	fs.DurationVar(&o.DrainTimeout, "waypoint-drain-timeout", o.DrainTimeout, "graceful drain bound of a waypoint")
}

// Validate reports every invalid setting.
func (o Options) Validate() error {
	var errs []error
	if o.Class == "" {
		errs = append(errs, errors.New("waypoint class is empty"))
	}
	if o.ControllerName == "" {
		errs = append(errs, errors.New("waypoint controller name is empty"))
	}
	if strings.TrimSpace(o.Image) == "" || strings.ContainsAny(o.Image, " \t\n") {
		errs = append(errs, fmt.Errorf("waypoint image %q is not an image reference", o.Image))
	}
	switch o.ImagePullPolicy {
	case corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		errs = append(errs, fmt.Errorf("waypoint image pull policy %q is not Always, IfNotPresent or Never", o.ImagePullPolicy))
	}
	if o.CPURequest.Sign() < 0 || o.MemoryRequest.Sign() < 0 || o.MemoryLimit.Sign() < 0 {
		errs = append(errs, errors.New("waypoint resources must not be negative"))
	}
	if !o.MemoryLimit.IsZero() && o.MemoryLimit.Cmp(o.MemoryRequest) < 0 {
		errs = append(errs, fmt.Errorf("waypoint memory limit %s is below its request %s", o.MemoryLimit.String(), o.MemoryRequest.String()))
	}
	if o.BlockedRetry <= 0 {
		errs = append(errs, fmt.Errorf("blocked retry must be positive, got %v", o.BlockedRetry))
	}
	if o.DrainTimeout <= 0 {
		errs = append(errs, fmt.Errorf("waypoint drain timeout must be positive, got %v", o.DrainTimeout))
	}
	if host, port, err := net.SplitHostPort(o.Controller); err != nil || host == "" || port == "" {
		errs = append(errs, fmt.Errorf("controller address %q is not host:port", o.Controller))
	}
	for _, f := range []struct{ name, v string }{
		{"trust domain", o.TrustDomain}, {"cluster domain", o.ClusterDomain}, {"root cert ConfigMap", o.RootCertConfigMap},
	} {
		if msgs := validation.IsDNS1123Subdomain(f.v); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("%s %q: %s", f.name, f.v, strings.Join(msgs, "; ")))
		}
	}
	for _, f := range []struct{ name, v string }{
		{"cluster id", o.ClusterID}, {"token audience", o.TokenAudience}, {"field owner", o.FieldOwner},
	} {
		if f.v == "" {
			errs = append(errs, fmt.Errorf("%s is empty", f.name))
		}
	}
	return errors.Join(errs...)
}

// controllerServerName is the name verified in the controller's
// certificate.
func (o Options) controllerServerName() string {
	if o.ControllerServerName != "" {
		return o.ControllerServerName
	}
	host, _, _ := net.SplitHostPort(o.Controller)
	return host
}
