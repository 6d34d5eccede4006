package plugin

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/amesh-dev/amesh/cni-plugin/internal/agentapi"
)

// Type is the plugin's "type" in a CNI configuration.
const Type = "amesh-cni"

// SupportedVersions returns the CNI spec versions this plugin speaks.
// 0.3.0 and 0.3.1 matter: kindnet, flannel and Calico write "0.3.1"
// conflists, and the runtime passes the list's version to every plugin of
// the chain. (CHECK is defined from 0.4.0 on, STATUS from 1.1.0.)
func SupportedVersions() []string { return []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} }

// checkVersion is the first spec version that defines CHECK.
const checkVersion = "0.4.0"

// DefaultExcludeNamespaces returns the namespaces that are never enrolled:
// the mesh's own pods and the cluster's system pods.
func DefaultExcludeNamespaces() []string { return []string{"amesh-system", "kube-system"} }

// NetConf is the plugin's entry in a conflist.
type NetConf struct {
	types.PluginConf
	// AgentSocket is the node agent's unix socket (agentapi.DefaultSocket).
	AgentSocket string `json:"agentSocket,omitempty"`
	// StateFile is the agent's state file (agentapi.DefaultStateFile).
	StateFile string `json:"stateFile,omitempty"`
	// AgentTimeout bounds one call to the agent ("30s").
	AgentTimeout string `json:"agentTimeout,omitempty"`
	// ExcludeNamespaces are passed through without asking the agent.
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`

	timeout time.Duration
	result  *current.Result // prevResult in the current result version, if any
}

// K8sArgs are the CNI_ARGS the kubelet (via the container runtime) passes.
type K8sArgs struct {
	types.CommonArgs
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive // CNI_ARGS key
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
}

// parseConfig decodes and validates the plugin's stdin. Every failure is a
// *types.Error with the matching CNI error code.
func parseConfig(stdin []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "amesh-cni: cannot decode network configuration", err.Error())
	}
	if conf.CNIVersion == "" {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "amesh-cni: cniVersion missing", "")
	}
	if !slices.Contains(SupportedVersions(), conf.CNIVersion) {
		return nil, types.NewError(types.ErrIncompatibleCNIVersion, "amesh-cni: incompatible CNI version",
			fmt.Sprintf("config version %q, plugin supports %v", conf.CNIVersion, SupportedVersions()))
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = agentapi.DefaultSocket
	}
	if conf.StateFile == "" {
		conf.StateFile = agentapi.DefaultStateFile
	}
	if conf.ExcludeNamespaces == nil {
		conf.ExcludeNamespaces = DefaultExcludeNamespaces()
	}
	conf.timeout = 30 * time.Second
	if conf.AgentTimeout != "" {
		d, err := time.ParseDuration(conf.AgentTimeout)
		if err != nil || d <= 0 {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, "amesh-cni: invalid agentTimeout",
				fmt.Sprintf("%q: want a positive duration", conf.AgentTimeout))
		}
		conf.timeout = d
	}
	if conf.RawPrevResult != nil {
		// prevResult comes in the configuration's version (types/040
		// reads 0.3.x and 0.4.0, types/100 1.x); it is converted to the
		// current result type, and printed back in the config's version.
		if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, "amesh-cni: cannot parse prevResult", err.Error())
		}
		res, err := current.NewResultFromResult(conf.PrevResult)
		if err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, "amesh-cni: cannot convert prevResult", err.Error())
		}
		for i, ip := range res.IPs {
			if ip == nil || ip.Address.IP == nil {
				return nil, types.NewError(types.ErrDecodingFailure, "amesh-cni: invalid prevResult",
					fmt.Sprintf("ips[%d] has no address", i))
			}
		}
		conf.result = res
	}
	return conf, nil
}

// podIPs returns the addresses of prevResult as text.
func (c *NetConf) podIPs() []string {
	if c.result == nil {
		return nil
	}
	var ips []string
	for _, ip := range c.result.IPs {
		if a, ok := netip.AddrFromSlice(ip.Address.IP); ok {
			ips = append(ips, a.Unmap().String())
		}
	}
	return ips
}

func parseArgs(s string) (*K8sArgs, error) {
	a := &K8sArgs{}
	if err := types.LoadArgs(s, a); err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "amesh-cni: invalid CNI_ARGS", err.Error())
	}
	return a, nil
}
