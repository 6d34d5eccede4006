package sample

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"time"
)

// Role is what an instance of the sample application does.
type Role string

// The roles.
const (
	RoleProductPage Role = "productpage"
	RoleDetails     Role = "details"
	RoleReviews     Role = "reviews"
	RoleRatings     Role = "ratings"
	RoleClient      Role = "client"
)

// Roles lists every role.
func Roles() []Role {
	return []Role{RoleProductPage, RoleDetails, RoleReviews, RoleRatings, RoleClient}
}

// MaxDelay bounds every injected delay.
const MaxDelay = time.Minute

// Config is everything one instance needs.
type Config struct {
	// Role chooses what this instance serves.
	Role Role
	// Version is the workload version (v1, v2…): reviews v2 calls ratings.
	Version string
	// Service names this instance's service in responses (default: the role).
	Service string
	// Pod and Namespace name this instance in responses (defaults: the
	// host name and "default").
	Pod, Namespace string
	// Listen is the address served: HTTP for every role but ratings, gRPC for ratings.
	Listen string

	// DetailsURL and ReviewsURL are productpage's upstreams (base URLs).
	DetailsURL, ReviewsURL string
	// RatingsAddr is reviews v2's gRPC upstream (host:port).
	RatingsAddr string
	// UpstreamTimeout bounds each upstream call.
	UpstreamTimeout time.Duration

	// Fault is this instance's default fault injection; request headers
	// override it per request.
	Fault Fault

	// DrainTimeout bounds the graceful shutdown.
	DrainTimeout time.Duration
	// AccessLog logs one line per request.
	AccessLog bool
	// LogLevel is debug, info, warn or error.
	LogLevel string

	// envErrs are malformed environment values found by RegisterFlags.
	envErrs []error
}

// Default returns the defaults (service names as Kubernetes DNS names in
// the instance's own namespace).
func Default() Config {
	host, _ := os.Hostname()
	return Config{
		Version:         "v1",
		Pod:             host,
		Namespace:       "default",
		Listen:          ":9080",
		DetailsURL:      "http://details:9080",
		ReviewsURL:      "http://reviews:9080",
		RatingsAddr:     "ratings:9080",
		UpstreamTimeout: 3 * time.Second,
		DrainTimeout:    5 * time.Second,
		LogLevel:        "info",
	}
}

// env returns the environment variable name, or def when it is unset or empty.
func env(name, def string) string {
	if v, ok := os.LookupEnv(name); ok && v != "" {
		return v
	}
	return def
}

// RegisterFlags binds the configuration to fs. Every flag takes its default
// from an environment variable (in brackets in the usage), so a Pod spec
// can configure an instance by env alone; flags win over the environment.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.Func("role", "productpage, details, reviews, ratings or client [ROLE]", func(s string) error {
		c.Role = Role(s)
		return nil
	})
	c.Role = Role(env("ROLE", string(c.Role)))
	fs.StringVar(&c.Version, "version", env("VERSION", c.Version), "workload version [VERSION]")
	fs.StringVar(&c.Service, "service", env("SERVICE_NAME", c.Service), "service name shown in responses (default: the role) [SERVICE_NAME]")
	fs.StringVar(&c.Pod, "pod", env("POD_NAME", c.Pod), "pod name shown in responses [POD_NAME]")
	fs.StringVar(&c.Namespace, "namespace", env("POD_NAMESPACE", c.Namespace), "namespace shown in responses [POD_NAMESPACE]")
	fs.StringVar(&c.Listen, "listen", env("LISTEN", c.Listen), "listen address [LISTEN]")
	fs.StringVar(&c.DetailsURL, "details-url", env("DETAILS_URL", c.DetailsURL), "productpage: base URL of details [DETAILS_URL]")
	fs.StringVar(&c.ReviewsURL, "reviews-url", env("REVIEWS_URL", c.ReviewsURL), "productpage: base URL of reviews [REVIEWS_URL]")
	fs.StringVar(&c.RatingsAddr, "ratings-addr", env("RATINGS_ADDR", c.RatingsAddr), "reviews v2: gRPC address of ratings [RATINGS_ADDR]")
	c.UpstreamTimeout = c.envDuration("UPSTREAM_TIMEOUT", c.UpstreamTimeout)
	fs.DurationVar(&c.UpstreamTimeout, "upstream-timeout", c.UpstreamTimeout, "timeout of each upstream call [UPSTREAM_TIMEOUT]")
	c.DrainTimeout = c.envDuration("DRAIN_TIMEOUT", c.DrainTimeout)
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", c.DrainTimeout, "graceful shutdown deadline [DRAIN_TIMEOUT]")
	if v := env("ACCESS_LOG", ""); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			c.envErrs = append(c.envErrs, fmt.Errorf("ACCESS_LOG=%q: %w", v, err))
		}
		c.AccessLog = b
	}
	fs.BoolVar(&c.AccessLog, "access-log", c.AccessLog, "log one line per request [ACCESS_LOG]")
	fs.StringVar(&c.LogLevel, "log-level", env("LOG_LEVEL", c.LogLevel), "debug, info, warn or error [LOG_LEVEL]")
	c.envErrs = append(c.envErrs, c.Fault.registerFlags(fs)...)
}

// envDuration parses a duration from the environment; a malformed value
// is recorded for Validate rather than silently replaced by the default.
func (c *Config) envDuration(name string, def time.Duration) time.Duration {
	v := env(name, "")
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		c.envErrs = append(c.envErrs, fmt.Errorf("%s=%q: %w", name, v, err))
		return def
	}
	return d
}

// Validate reports every invalid setting.
func (c *Config) Validate() error {
	errs := append([]error(nil), c.envErrs...)
	known := false
	for _, r := range Roles() {
		known = known || c.Role == r
	}
	if !known {
		errs = append(errs, fmt.Errorf("role %q: want one of %v", c.Role, Roles()))
	}
	if c.Version == "" {
		errs = append(errs, errors.New("version is required"))
	}
	if c.Pod == "" {
		errs = append(errs, errors.New("pod is required"))
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("listen %q: %w", c.Listen, err))
	}
	if c.Role == RoleProductPage {
		for name, v := range map[string]string{"details-url": c.DetailsURL, "reviews-url": c.ReviewsURL} {
			if u, err := url.Parse(v); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				errs = append(errs, fmt.Errorf("%s %q: want an http(s) URL", name, v))
			}
		}
	}
	if c.Role == RoleReviews && c.Version != "v1" {
		if _, _, err := net.SplitHostPort(c.RatingsAddr); err != nil {
			errs = append(errs, fmt.Errorf("ratings-addr %q: %w", c.RatingsAddr, err))
		}
	}
	if c.UpstreamTimeout <= 0 {
		errs = append(errs, errors.New("upstream-timeout must be a positive duration"))
	}
	if c.DrainTimeout < 0 {
		errs = append(errs, errors.New("drain-timeout must be a non-negative duration"))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log-level %q: want debug, info, warn or error", c.LogLevel))
	}
	if err := c.Fault.validate(c.Role); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// servedBy names this instance.
func (c *Config) servedBy() ServedBy {
	svc := c.Service
	if svc == "" {
		svc = string(c.Role)
	}
	return ServedBy{Service: svc, Version: c.Version, Pod: c.Pod, Namespace: c.Namespace}
}
