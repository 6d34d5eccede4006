// Package podnet gives pods their network through the real CNI chain, as a
// container runtime does: the first network configuration (sorted by file
// name) in the node's CNI config directory is loaded for every ADD, so
// plugins that a DaemonSet chains in later (amesh-cni) take part, and the
// plugin binaries are looked up in the node's CNI binary directories.
package podnet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
)

// Network runs CNI for pods.
type Network struct {
	cni     *libcni.CNIConfig
	confDir string
}

// Pod identifies a pod sandbox to CNI.
type Pod struct {
	Namespace, Name, UID string
	// ID is the sandbox (CNI container) ID.
	ID string
	// Netns is the path of the pod's network namespace.
	Netns string
	// PortMappings are the pod's hostPorts (the portMappings capability).
	PortMappings []PortMapping
}

// PortMapping is one hostPort, in the CNI portMappings capability format.
type PortMapping struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol"`
	HostIP        string `json:"hostIP,omitempty"`
}

// ErrNoConfig means the node has no CNI configuration (network not ready).
var ErrNoConfig = errors.New("no CNI network configuration")

// New returns a Network using the configurations in confDir, plugins from
// binDirs and libcni's cache in cacheDir.
func New(confDir string, binDirs []string, cacheDir string) *Network {
	return &Network{cni: libcni.NewCNIConfigWithCacheDir(binDirs, cacheDir, nil), confDir: confDir}
}

// Config loads the node's current network configuration list.
func (n *Network) Config() (*libcni.NetworkConfigList, error) {
	files, err := libcni.ConfFiles(n.confDir, []string{".conf", ".conflist", ".json"})
	if err != nil {
		return nil, fmt.Errorf("list CNI configs in %s: %w", n.confDir, err)
	}
	var errs []error
	for _, f := range files { // ConfFiles returns them sorted
		list, err := loadFile(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", filepath.Base(f), err))
			continue
		}
		if len(list.Plugins) == 0 {
			errs = append(errs, fmt.Errorf("%s: no plugins", filepath.Base(f)))
			continue
		}
		return list, nil
	}
	return nil, fmt.Errorf("%w in %s: %w", ErrNoConfig, n.confDir, errors.Join(errs...))
}

// loadFile loads a network configuration list, or a single plugin
// configuration (.conf) as a list of one, as container runtimes do.
func loadFile(f string) (*libcni.NetworkConfigList, error) {
	if strings.HasSuffix(f, ".conflist") {
		return libcni.NetworkConfFromFile(f)
	}
	raw, err := os.ReadFile(f)
	if err != nil {
		return nil, err
	}
	var conf map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	if _, ok := conf["plugins"]; ok {
		return libcni.NetworkConfFromBytes(raw)
	}
	list, err := json.Marshal(map[string]any{"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": []any{conf}})
	if err != nil {
		return nil, err
	}
	return libcni.NetworkConfFromBytes(list)
}

func (p Pod) runtimeConf() *libcni.RuntimeConf {
	var caps map[string]any
	if len(p.PortMappings) > 0 {
		caps = map[string]any{"portMappings": p.PortMappings}
	}
	return &libcni.RuntimeConf{
		CapabilityArgs: caps,
		ContainerID:    p.ID,
		NetNS:          p.Netns,
		IfName:         "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", p.Namespace},
			{"K8S_POD_NAME", p.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", p.ID},
			{"K8S_POD_UID", p.UID},
		},
	}
}

var loopback = []byte(`{"cniVersion":"1.0.0","name":"cni-loopback","plugins":[{"type":"loopback"}]}`)

// Add brings up lo and runs ADD of the node's network for p; it returns the
// pod's IP addresses.
func (n *Network) Add(ctx context.Context, p Pod) ([]netip.Addr, error) {
	lo, err := libcni.ConfListFromBytes(loopback)
	if err != nil {
		return nil, fmt.Errorf("loopback config: %w", err)
	}
	if _, err := n.cni.AddNetworkList(ctx, lo, p.runtimeConf()); err != nil {
		return nil, fmt.Errorf("CNI loopback ADD: %w", err)
	}
	list, err := n.Config()
	if err != nil {
		return nil, err
	}
	res, err := n.cni.AddNetworkList(ctx, list, p.runtimeConf())
	if err != nil {
		return nil, fmt.Errorf("CNI ADD %s (%s): %w", list.Name, pluginTypes(list), err)
	}
	return ips(res)
}

// Del runs DEL of the network used at ADD (from libcni's cache, else the
// current configuration). DEL is idempotent.
func (n *Network) Del(ctx context.Context, p Pod) error {
	var errs []error
	list, err := n.Config()
	if err != nil {
		errs = append(errs, err)
	} else if err := n.cni.DelNetworkList(ctx, list, p.runtimeConf()); err != nil {
		errs = append(errs, fmt.Errorf("CNI DEL %s (%s): %w", list.Name, pluginTypes(list), err))
	}
	if lo, err := libcni.ConfListFromBytes(loopback); err == nil {
		if err := n.cni.DelNetworkList(ctx, lo, p.runtimeConf()); err != nil {
			errs = append(errs, fmt.Errorf("CNI loopback DEL: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Status runs the CNI STATUS verb of the current configuration (plugins
// older than spec 1.1.0 are assumed ready).
func (n *Network) Status(ctx context.Context) error {
	list, err := n.Config()
	if err != nil {
		return err
	}
	return n.cni.GetStatusNetworkList(ctx, list)
}

func pluginTypes(list *libcni.NetworkConfigList) string {
	ts := make([]string, len(list.Plugins))
	for i, p := range list.Plugins {
		ts[i] = p.Network.Type
	}
	return strings.Join(ts, "→")
}

func ips(res types.Result) ([]netip.Addr, error) {
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		return nil, fmt.Errorf("convert CNI result: %w", err)
	}
	var out []netip.Addr
	for _, ip := range r.IPs {
		if ip.Interface != nil && *ip.Interface >= 0 && *ip.Interface < len(r.Interfaces) && r.Interfaces[*ip.Interface].Sandbox == "" {
			continue // an address on the host side, not the pod's
		}
		a, ok := netip.AddrFromSlice(ip.Address.IP)
		if ok {
			out = append(out, a.Unmap())
		}
	}
	if len(out) == 0 {
		return nil, errors.New("CNI result has no pod IP")
	}
	return out, nil
}
