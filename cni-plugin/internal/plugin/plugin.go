// Package plugin implements the amesh-cni chained CNI plugin: it runs after
// the node's primary CNI, asks the node agent (package agentapi) to set up
// redirection for pods enrolled in the mesh, and returns the previous
// result unchanged. It fails closed: an enrolled pod whose redirection
// cannot be confirmed does not start.
//
// Decision table for ADD:
//
//	no Kubernetes pod in CNI_ARGS, excluded namespace,
//	host-network sandbox                        → pass through
//	agent answers enrolled (rules in place,
//	ztunnel acked)                              → pass through
//	agent answers not enrolled                  → pass through
//	agent answers an error                      → error 100 (redirection failed)
//	agent took the request but did not answer
//	(timed out, went away)                      → error 11 (try again later)
//	agent unreachable, namespace excluded per
//	its state file (no readable state file:
//	the system namespace amesh-system)          → pass through
//	agent unreachable, any other pod            → error 11 (try again later)
//
// DEL never fails because the agent is away or silent (the agent
// reconciles pods that vanished meanwhile); CHECK follows ADD's rules;
// STATUS reports error 50 while the agent is unreachable or not ready.
package plugin

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	"golang.org/x/sys/unix"

	"github.com/amesh-dev/amesh/cni-plugin/internal/agentapi"
)

// Plugin-specific CNI error codes (100 and above are free for plugins).
const (
	// ErrRedirection: the agent failed to set up (or verify) redirection
	// for an enrolled pod.
	ErrRedirection uint = 100
)

// About is printed by the plugin when run without CNI_COMMAND.
const About = "amesh-cni: chains after the primary CNI and redirects enrolled pods' traffic into ztunnel"

// Funcs returns the skel callbacks.
func Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: Add, Del: Del, Check: Check, Status: Status}
}

type invocation struct {
	conf *NetConf
	args *K8sArgs
	req  *agentapi.PodRequest
}

func load(a *skel.CmdArgs) (*invocation, error) {
	conf, err := parseConfig(a.StdinData)
	if err != nil {
		return nil, err
	}
	k8s, err := parseArgs(a.Args)
	if err != nil {
		return nil, err
	}
	req := &agentapi.PodRequest{
		ContainerID:  a.ContainerID,
		Netns:        a.Netns,
		IfName:       a.IfName,
		PodName:      string(k8s.K8S_POD_NAME),
		PodNamespace: string(k8s.K8S_POD_NAMESPACE),
		PodUID:       string(k8s.K8S_POD_UID),
		IPs:          conf.podIPs(),
	}
	return &invocation{conf: conf, args: k8s, req: req}, nil
}

// passThrough reports whether the pod is none of the mesh's business
// regardless of what the agent would say.
func (inv *invocation) passThrough() bool {
	if inv.req.PodName == "" || inv.req.PodNamespace == "" {
		return true // not a Kubernetes pod
	}
	if slices.Contains(inv.conf.ExcludeNamespaces, inv.req.PodNamespace) {
		return true
	}
	return inv.req.Netns != "" && isHostNetns(inv.req.Netns)
}

// isHostNetns reports whether path is the network namespace this plugin
// runs in (the host's): a host-network sandbox.
func isHostNetns(path string) bool {
	var a, b unix.Stat_t
	if unix.Stat(path, &a) != nil || unix.Stat("/proc/self/ns/net", &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

func (inv *invocation) client() *agentapi.Client {
	return agentapi.NewClient(inv.conf.AgentSocket, inv.conf.timeout)
}

func (inv *invocation) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), inv.conf.timeout)
}

// unreachable decides for a pod when the agent cannot be reached. Whether
// the pod is enrolled cannot be known (its own label, or its namespace
// labelled while the agent was away, enrols it), and a pod that starts
// unprotected stays so for its connections' lifetime: every pod is
// refused, except those of the namespaces the agent excludes from the mesh
// (its state file's list) — without that list, those of the mesh's own
// namespace, so that the mesh can always come up.
func (inv *invocation) unreachable(cause error) error {
	ns := inv.req.PodNamespace
	st, err := agentapi.ReadState(inv.conf.StateFile)
	switch {
	case err == nil && st.ExcludedNamespaces != nil:
		if st.Excluded(ns) {
			return nil
		}
	case ns == agentapi.SystemNamespace:
		return nil
	}
	details := cause.Error()
	if err != nil {
		details += "; state file: " + err.Error()
	}
	return types.NewError(types.ErrTryAgainLater,
		fmt.Sprintf("amesh-cni: node agent unreachable; refusing pod %s/%s until it is back (fail closed: only the namespaces it excludes from the mesh start without it)",
			ns, inv.req.PodName), details)
}

func agentFailed(op string, err error) error {
	var ae *agentapi.AgentError
	if errors.As(err, &ae) && ae.Status == 503 {
		return types.NewError(types.ErrTryAgainLater, "amesh-cni: node agent not ready", ae.Msg)
	}
	if errors.Is(err, agentapi.ErrNoAnswer) {
		return types.NewError(types.ErrTryAgainLater,
			"amesh-cni: node agent did not answer; refusing the pod (fail closed)", err.Error())
	}
	return types.NewError(ErrRedirection, "amesh-cni: "+op+" failed", err.Error())
}

// Add handles CNI ADD.
func Add(a *skel.CmdArgs) error {
	inv, err := load(a)
	if err != nil {
		return err
	}
	if inv.conf.result == nil {
		return types.NewError(types.ErrInvalidNetworkConfig,
			"amesh-cni: must be chained after a plugin that returns a result (no prevResult)", "")
	}
	if !inv.passThrough() {
		ctx, cancel := inv.ctx()
		defer cancel()
		if _, err := inv.client().Add(ctx, inv.req); err != nil {
			if errors.Is(err, agentapi.ErrUnreachable) {
				if err := inv.unreachable(err); err != nil {
					return err
				}
			} else {
				return agentFailed("redirection", err)
			}
		}
	}
	return types.PrintResult(inv.conf.result, inv.conf.CNIVersion)
}

// Del handles CNI DEL. It is idempotent and does not fail when the agent
// is unreachable.
func Del(a *skel.CmdArgs) error {
	inv, err := load(a)
	if err != nil {
		return err
	}
	if inv.passThrough() {
		return nil
	}
	ctx, cancel := inv.ctx()
	defer cancel()
	if _, err := inv.client().Del(ctx, inv.req); err != nil &&
		!errors.Is(err, agentapi.ErrUnreachable) && !errors.Is(err, agentapi.ErrNoAnswer) {
		return agentFailed("cleanup", err)
	}
	return nil
}

// Check handles CNI CHECK.
func Check(a *skel.CmdArgs) error {
	inv, err := load(a)
	if err != nil {
		return err
	}
	if ok, err := version.GreaterThanOrEqualTo(inv.conf.CNIVersion, checkVersion); err != nil || !ok {
		return types.NewError(types.ErrIncompatibleCNIVersion, "amesh-cni: CHECK is not defined before CNI spec "+checkVersion,
			fmt.Sprintf("config version %q", inv.conf.CNIVersion))
	}
	if inv.conf.result == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "amesh-cni: CHECK needs prevResult", "")
	}
	if inv.passThrough() {
		return nil
	}
	ctx, cancel := inv.ctx()
	defer cancel()
	if _, err := inv.client().Check(ctx, inv.req); err != nil {
		if errors.Is(err, agentapi.ErrUnreachable) {
			return inv.unreachable(err)
		}
		return agentFailed("check", err)
	}
	return nil
}

// Status handles CNI STATUS (spec 1.1.0): ready only when the agent is.
func Status(a *skel.CmdArgs) error {
	conf, err := parseConfig(a.StdinData)
	if err != nil {
		return err
	}
	inv := &invocation{conf: conf}
	ctx, cancel := inv.ctx()
	defer cancel()
	if err := inv.client().Status(ctx); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "amesh-cni: node agent not available", err.Error())
	}
	return nil
}
