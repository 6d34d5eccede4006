// Package node is the local cluster's node agent: it does the kubelet's job
// for one node (a network namespace with its own root filesystem view). It
// registers the Node and renews its Lease, runs the pods bound to the node as
// sandboxed processes with networking from the node's CNI chain, volumes,
// environment, probes, restarts and graceful termination, reports pod status,
// serves logs, exec and port-forward to the apiserver, and keeps node daemons
// such as kube-proxy running.
package node

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
)

// Daemon is a node-level process the agent keeps running (kube-proxy).
type Daemon struct {
	Name string   `json:"name"`
	Args []string `json:"args"`
}

// Config of a node agent. Paths are in the node's view of the filesystem.
type Config struct {
	NodeName    string `json:"nodeName"`
	ClusterName string `json:"clusterName"`
	Kubeconfig  string `json:"kubeconfig"`

	NodeIP        netip.Addr   `json:"nodeIP"`
	PodCIDR       netip.Prefix `json:"podCIDR"`
	ClusterDNS    netip.Addr   `json:"clusterDNS"`
	ClusterDomain string       `json:"clusterDomain"`

	// StateDir holds the agent's files and the pods' volumes.
	StateDir string `json:"stateDir"`
	// LogDir holds container logs (/var/log/pods layout).
	LogDir string `json:"logDir"`
	// DaemonLogDir holds the logs of node daemons.
	DaemonLogDir string `json:"daemonLogDir"`

	CNIConfDir  string   `json:"cniConfDir"`
	CNIBinDirs  []string `json:"cniBinDirs"`
	CNICacheDir string   `json:"cniCacheDir"`
	// NetnsDir is where pod network namespaces are pinned.
	NetnsDir string `json:"netnsDir"`
	// NetnsPrefix starts every pod namespace name.
	NetnsPrefix string `json:"netnsPrefix"`

	// CgroupDir is the node's cgroup; pods and daemons go below it.
	CgroupDir string `json:"cgroupDir"`
	// Helper is the binary that runs sandbox.Init (usually this agent).
	Helper string `json:"helper"`
	// ImagesFile is the image table (YAML or JSON).
	ImagesFile string `json:"imagesFile"`
	// Masks are node paths hidden from containers (the agent's secrets).
	Masks []string `json:"masks"`

	Port       int    `json:"port"`
	ServingCrt string `json:"servingCrt"`
	ServingKey string `json:"servingKey"`
	ClientCA   string `json:"clientCA"`

	CPU    string `json:"cpu"`
	Memory string `json:"memory"`
	Pods   int    `json:"pods"`

	// Version is reported as the kubelet version.
	Version string `json:"version"`
	// RestartBackoff is the first crash-loop delay; it doubles up to
	// MaxRestartBackoff (the kubelet uses 10s and 5m).
	RestartBackoff    Duration `json:"restartBackoff"`
	MaxRestartBackoff Duration `json:"maxRestartBackoff"`
	// ShutdownGrace bounds container termination when the agent stops.
	ShutdownGrace Duration `json:"shutdownGrace"`

	Daemons []Daemon `json:"daemons"`
}

// Duration is a time.Duration that marshals as a string ("10s").
type Duration time.Duration

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// Load reads a JSON config, applies defaults and validates it.
func Load(path string) (Config, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read node config: %w", err)
	}
	var c Config
	if err := json.Unmarshal(raw, &c); err != nil {
		return Config{}, fmt.Errorf("parse node config %s: %w", path, err)
	}
	c.Default()
	return c, c.Validate()
}

// Default fills unset fields.
func (c *Config) Default() {
	if c.ClusterDomain == "" {
		c.ClusterDomain = "cluster.local"
	}
	if c.StateDir == "" {
		c.StateDir = "/var/lib/amesh-node"
	}
	if c.LogDir == "" {
		c.LogDir = "/var/log/pods"
	}
	if c.DaemonLogDir == "" {
		c.DaemonLogDir = filepath.Join(c.StateDir, "logs")
	}
	if c.CNIConfDir == "" {
		c.CNIConfDir = "/etc/cni/net.d"
	}
	if len(c.CNIBinDirs) == 0 {
		c.CNIBinDirs = []string{"/opt/cni/bin", "/usr/lib/cni"}
	}
	if c.CNICacheDir == "" {
		c.CNICacheDir = "/var/lib/cni"
	}
	if c.NetnsDir == "" {
		c.NetnsDir = "/run/netns"
	}
	if c.NetnsPrefix == "" {
		c.NetnsPrefix = "cni-"
	}
	if c.Port == 0 {
		c.Port = 10250
	}
	if c.CPU == "" {
		c.CPU = "8"
	}
	if c.Memory == "" {
		c.Memory = "16Gi"
	}
	if c.Pods == 0 {
		c.Pods = 110
	}
	if c.Version == "" {
		c.Version = "v0.0.0-amesh"
	}
	if c.RestartBackoff == 0 {
		c.RestartBackoff = Duration(10 * time.Second)
	}
	if c.MaxRestartBackoff == 0 {
		c.MaxRestartBackoff = Duration(5 * time.Minute)
	}
	if c.ShutdownGrace == 0 {
		c.ShutdownGrace = Duration(5 * time.Second)
	}
	if c.Masks == nil {
		c.Masks = []string{c.StateDir}
	}
}

// Validate checks the config.
func (c *Config) Validate() error {
	var errs []error
	if c.NodeName == "" {
		errs = append(errs, errors.New("nodeName is required"))
	}
	if c.Kubeconfig == "" {
		errs = append(errs, errors.New("kubeconfig is required"))
	}
	if !c.NodeIP.IsValid() {
		errs = append(errs, errors.New("nodeIP is required"))
	}
	if !c.PodCIDR.IsValid() {
		errs = append(errs, errors.New("podCIDR is required"))
	}
	if !c.ClusterDNS.IsValid() {
		errs = append(errs, errors.New("clusterDNS is required"))
	}
	if c.Helper == "" {
		errs = append(errs, errors.New("helper is required"))
	}
	if c.CgroupDir == "" {
		errs = append(errs, errors.New("cgroupDir is required"))
	}
	for name, p := range map[string]string{"stateDir": c.StateDir, "logDir": c.LogDir, "cniConfDir": c.CNIConfDir, "netnsDir": c.NetnsDir, "cgroupDir": c.CgroupDir} {
		if !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("%s %q must be absolute", name, p))
		}
	}
	if _, err := resource.ParseQuantity(c.CPU); err != nil {
		errs = append(errs, fmt.Errorf("cpu: %w", err))
	}
	if _, err := resource.ParseQuantity(c.Memory); err != nil {
		errs = append(errs, fmt.Errorf("memory: %w", err))
	}
	if c.ServingCrt == "" || c.ServingKey == "" || c.ClientCA == "" {
		errs = append(errs, errors.New("servingCrt, servingKey and clientCA are required"))
	}
	if c.RestartBackoff <= 0 || c.MaxRestartBackoff < c.RestartBackoff {
		errs = append(errs, errors.New("restart backoff must be positive and not above its maximum"))
	}
	for _, d := range c.Daemons {
		if d.Name == "" || len(d.Args) == 0 {
			errs = append(errs, fmt.Errorf("daemon %q needs a name and a command", d.Name))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("node config: %w", errors.Join(errs...))
	}
	return nil
}
