package agent

import (
	"errors"
	"flag"
	"fmt"
	"strings"
	"time"

	"k8s.io/client-go/rest"

	"github.com/amesh-dev/amesh/api/zds"
	"github.com/amesh-dev/amesh/cni-plugin/internal/agentapi"
	"github.com/amesh-dev/amesh/cni-plugin/internal/plugin"
)

// Config is the node agent's configuration.
type Config struct {
	NodeName   string // this node (required)
	Kubeconfig string // "" = in-cluster
	// RestConfig, when set, is used instead of Kubeconfig (tests).
	RestConfig *rest.Config

	InstallCNI   bool   // copy the plugin and chain it into the conflist
	CNIConfDir   string // CNI conf dir
	CNIBinDir    string // CNI bin dir
	PluginBinary string // the amesh-cni binary to install

	// DaemonSetName and DaemonSetNamespace name the agent's own DaemonSet
	// (namespace default $POD_NAMESPACE, from the downward API). On
	// SIGTERM the agent asks for it: if it is gone or being deleted (an
	// uninstall), the agent unchains the plugin and removes its binary and
	// the state file; otherwise (a restart, a rolling update) everything
	// stays. Empty name: the agent never unchains itself.
	DaemonSetName      string
	DaemonSetNamespace string

	AgentSocket string // plugin ↔ agent socket
	StateFile   string // plugin fallback state
	ZDSSocket   string // ztunnel ↔ agent socket
	// HostNetns is the path of the node's network namespace ("" = the
	// agent's own, the normal case for a hostNetwork DaemonSet).
	HostNetns string
	ProcRoot  string // where to scan for pod netns ("/proc")

	ExcludeNamespaces []string
	MonitorAddr       string // /healthz, /readyz, /metrics
	AckTimeout        time.Duration
	// LeaveTimeout bounds how long a pod leaving the mesh keeps its
	// connections through ztunnel (ztunnel drains them meanwhile) before
	// the rest are reset and its capture rules removed.
	LeaveTimeout time.Duration
	Resync       time.Duration
	LogLevel     string
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		InstallCNI:        true,
		CNIConfDir:        "/etc/cni/net.d",
		CNIBinDir:         "/opt/cni/bin",
		PluginBinary:      "/usr/local/bin/amesh-cni", // where the image puts it
		AgentSocket:       agentapi.DefaultSocket,
		StateFile:         agentapi.DefaultStateFile,
		ZDSSocket:         zds.DefaultSocket,
		ProcRoot:          "/proc",
		ExcludeNamespaces: plugin.DefaultExcludeNamespaces(),
		MonitorAddr:       ":15121",
		AckTimeout:        5 * time.Second,
		LeaveTimeout:      30 * time.Second,
		Resync:            5 * time.Minute,
		LogLevel:          "info",
	}
}

// stringList is a comma-separated flag.
type stringList struct{ v *[]string }

func (s stringList) String() string {
	if s.v == nil {
		return ""
	}
	return strings.Join(*s.v, ",")
}

func (s stringList) Set(v string) error {
	*s.v = nil
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*s.v = append(*s.v, p)
		}
	}
	return nil
}

// RegisterFlags binds the configuration to flags.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.NodeName, "node-name", c.NodeName, "this node's name (default $NODE_NAME)")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", c.Kubeconfig, "kubeconfig file (empty: in-cluster)")
	fs.BoolVar(&c.InstallCNI, "install-cni", c.InstallCNI, "install the plugin binary and chain it into the CNI configuration")
	fs.StringVar(&c.CNIConfDir, "cni-conf-dir", c.CNIConfDir, "CNI configuration directory")
	fs.StringVar(&c.CNIBinDir, "cni-bin-dir", c.CNIBinDir, "CNI plugin directory")
	fs.StringVar(&c.PluginBinary, "plugin-binary", c.PluginBinary, "amesh-cni binary to install")
	fs.StringVar(&c.DaemonSetName, "daemonset-name", c.DaemonSetName,
		"the agent's own DaemonSet: when it is gone or being deleted at SIGTERM, the agent uninstalls the plugin (empty: never)")
	fs.StringVar(&c.DaemonSetNamespace, "daemonset-namespace", c.DaemonSetNamespace, "namespace of the agent's DaemonSet (default $POD_NAMESPACE)")
	fs.StringVar(&c.AgentSocket, "agent-socket", c.AgentSocket, "unix socket the plugin calls")
	fs.StringVar(&c.StateFile, "state-file", c.StateFile, "state file the plugin falls back on")
	fs.StringVar(&c.ZDSSocket, "zds-socket", c.ZDSSocket, "unix socket ztunnel connects to")
	fs.StringVar(&c.HostNetns, "host-netns", c.HostNetns, "node network namespace path (empty: the agent's own)")
	fs.StringVar(&c.ProcRoot, "proc", c.ProcRoot, "procfs root scanned for pod network namespaces")
	fs.Var(stringList{&c.ExcludeNamespaces}, "exclude-namespaces", "comma-separated namespaces never enrolled")
	fs.StringVar(&c.MonitorAddr, "monitor-addr", c.MonitorAddr, "address of /healthz, /readyz and /metrics")
	fs.DurationVar(&c.AckTimeout, "ack-timeout", c.AckTimeout, "how long to wait for ztunnel's ack")
	fs.DurationVar(&c.LeaveTimeout, "leave-timeout", c.LeaveTimeout,
		"how long the connections through ztunnel of a pod leaving the mesh may last (longer than ztunnel's -drain-timeout) before they are reset and its rules removed")
	fs.DurationVar(&c.Resync, "resync", c.Resync, "informer resync period")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
}

// Validate reports configuration errors.
func (c *Config) Validate() error {
	var errs []error
	if c.NodeName == "" {
		errs = append(errs, errors.New("node name is required (-node-name or $NODE_NAME)"))
	}
	for name, v := range map[string]string{"agent socket": c.AgentSocket, "state file": c.StateFile,
		"zds socket": c.ZDSSocket, "proc root": c.ProcRoot} {
		if v == "" {
			errs = append(errs, fmt.Errorf("%s is required", name))
		}
	}
	if c.InstallCNI && (c.CNIConfDir == "" || c.CNIBinDir == "") {
		errs = append(errs, errors.New("CNI conf and bin dirs are required to install the plugin"))
	}
	if c.DaemonSetName != "" && c.DaemonSetNamespace == "" {
		errs = append(errs, errors.New("the DaemonSet's namespace is required with its name (-daemonset-namespace or $POD_NAMESPACE)"))
	}
	if c.AckTimeout <= 0 || c.LeaveTimeout <= 0 || c.Resync < 0 {
		errs = append(errs, errors.New("ack and leave timeouts must be positive and resync non-negative"))
	}
	return errors.Join(errs...)
}
