package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/amesh-dev/amesh/api/capture"
	zdsv1 "github.com/amesh-dev/amesh/api/zds/v1"
	"github.com/amesh-dev/amesh/cni-plugin/internal/podns"
	"github.com/amesh-dev/amesh/cni-plugin/internal/zdsserver"
)

// Status is a pod's redirection state, as written to the pod annotation.
type Status string

// Redirection states (DESIGN.md §2).
const (
	StatusNone    Status = ""
	StatusPending Status = "pending" // rules in place, ztunnel has not acknowledged the pod
	StatusEnabled Status = "enabled" // rules in place and ztunnel serves the pod
	StatusFailed  Status = "failed"  // the rules could not be installed
)

// PodInfo is what the node needs to know about a pod to enrol it.
type PodInfo struct {
	UID, Name, Namespace, ServiceAccount string
	IPs                                  []netip.Addr
	ProbePorts                           []uint16
}

func (p PodInfo) equal(o PodInfo) bool {
	return p.UID == o.UID && p.Name == o.Name && p.Namespace == o.Namespace &&
		p.ServiceAccount == o.ServiceAccount && slices.Equal(p.IPs, o.IPs) && slices.Equal(p.ProbePorts, o.ProbePorts)
}

func (p PodInfo) workload(node string, netns *os.File) zdsserver.Workload {
	ips := make([]string, 0, len(p.IPs))
	for _, ip := range p.IPs {
		ips = append(ips, ip.String())
	}
	return zdsserver.Workload{UID: p.UID, Netns: netns, Info: &zdsv1.WorkloadInfo{
		Name: p.Name, Namespace: p.Namespace, ServiceAccount: p.ServiceAccount, Ips: ips, Node: node,
	}}
}

type pod struct {
	info    PodInfo
	netns   *os.File
	capture capture.Config
	acked   bool
}

// Node holds the enrolled pods of this node and performs enrolment:
// capture rules inside the pod's netns, then the hand-off to ztunnel.
type Node struct {
	log       *zap.Logger
	zds       *zdsserver.Server
	name      string
	procRoot  string
	hostNetns string // path of the node's netns ("" = the agent's own)

	op sync.Mutex // serialises Enroll/Unenroll

	mu        sync.Mutex
	pods      map[string]*pod    // by UID: pods whose rules are installed
	sandboxes map[string]sandbox // by UID: the sandbox of the pod's last CNI ADD
}

// sandbox is what a CNI ADD reported about a pod's sandbox.
type sandbox struct {
	containerID string
	netns       string // path
}

// NewNode allocates a Node.
func NewNode(log *zap.Logger, zds *zdsserver.Server, nodeName, procRoot, hostNetns string) *Node {
	return &Node{log: log, zds: zds, name: nodeName, procRoot: procRoot, hostNetns: hostNetns,
		pods: map[string]*pod{}, sandboxes: map[string]sandbox{}}
}

// SetZDS sets the ZDS server (wiring: the server needs Snapshot first).
func (n *Node) SetZDS(z *zdsserver.Server) { n.zds = z }

// RecordSandbox remembers the sandbox (container ID and netns path) a CNI
// ADD reported for a pod: the pod's current sandbox from now on.
func (n *Node) RecordSandbox(uid, containerID, netnsPath string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.sandboxes[uid] = sandbox{containerID: containerID, netns: netnsPath}
}

// StaleSandbox reports whether containerID names a sandbox of the pod
// other than the one its last CNI ADD reported: the runtime replaced the
// sandbox and a DEL of the old one arrives late. Without a record (the
// agent restarted since the ADD) nothing is stale.
func (n *Node) StaleSandbox(uid, containerID string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	sb, ok := n.sandboxes[uid]
	return ok && containerID != "" && sb.containerID != "" && sb.containerID != containerID
}

// Status returns a pod's redirection state.
func (n *Node) Status(uid string) Status {
	n.mu.Lock()
	defer n.mu.Unlock()
	p := n.pods[uid]
	switch {
	case p == nil:
		return StatusNone
	case p.acked:
		return StatusEnabled
	default:
		return StatusPending
	}
}

// Enrolled returns the UIDs of the pods whose rules are installed.
func (n *Node) Enrolled() map[string]PodInfo {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]PodInfo, len(n.pods))
	for uid, p := range n.pods {
		out[uid] = p.info
	}
	return out
}

// Snapshot returns the enrolled pods for ztunnel (ZDS snapshot).
func (n *Node) Snapshot() []zdsserver.Workload {
	n.mu.Lock()
	defer n.mu.Unlock()
	ws := make([]zdsserver.Workload, 0, len(n.pods))
	for _, p := range n.pods {
		ws = append(ws, p.info.workload(n.name, p.netns))
	}
	return ws
}

// openNetns finds the pod's network namespace: the path CNI reported, or
// a /proc scan by pod IP.
func (n *Node) openNetns(info PodInfo) (*os.File, error) {
	n.mu.Lock()
	path := n.sandboxes[info.UID].netns
	n.mu.Unlock()
	if path != "" {
		f, err := podns.Open(path)
		if err == nil {
			return f, nil
		}
		n.log.Warn("recorded netns unusable; scanning /proc", zap.String("uid", info.UID), zap.Error(err))
	}
	var host *os.File
	if n.hostNetns != "" {
		if f, err := os.Open(n.hostNetns); err == nil {
			host = f
			defer f.Close()
		}
	} else if f, err := os.Open("/proc/self/ns/net"); err == nil {
		host = f
		defer f.Close()
	}
	return podns.FindByIP(n.procRoot, info.IPs, host)
}

// sandboxChanged reports whether the netns path CNI last reported for the
// pod is a different namespace than held.
func (n *Node) sandboxChanged(uid string, held *os.File) bool {
	n.mu.Lock()
	path := n.sandboxes[uid].netns
	n.mu.Unlock()
	if path == "" {
		return false
	}
	f, err := podns.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	a, err1 := podns.InodeOf(f)
	b, err2 := podns.InodeOf(held)
	return err1 == nil && err2 == nil && a != b
}

// probeSources returns the node's source addresses toward the pod's IPs:
// the addresses the kubelet's probes come from.
func (n *Node) probeSources(ips []netip.Addr) []netip.Addr {
	var out []netip.Addr
	lookup := func() error {
		for _, ip := range ips {
			routes, err := netlink.RouteGet(ip.AsSlice())
			if err != nil {
				continue
			}
			for _, r := range routes {
				if src, ok := netip.AddrFromSlice(r.Src); ok && src.IsValid() && !src.IsUnspecified() {
					out = append(out, src.Unmap())
				}
			}
		}
		return nil
	}
	if n.hostNetns == "" {
		_ = lookup()
		return out
	}
	f, err := os.Open(n.hostNetns)
	if err != nil {
		return nil
	}
	defer f.Close()
	_ = podns.Do(f, lookup)
	return out
}

// Enroll installs the capture rules in the pod's netns and hands the pod
// to ztunnel, waiting for its ack. It is idempotent. The returned status
// is pending when the rules are in place but ztunnel did not acknowledge
// (err says why), failed when the rules could not be installed.
func (n *Node) Enroll(ctx context.Context, info PodInfo) (Status, error) {
	n.op.Lock()
	defer n.op.Unlock()
	n.mu.Lock()
	p := n.pods[info.UID]
	n.mu.Unlock()

	netns, fresh := (*os.File)(nil), false
	if p != nil && n.sandboxChanged(info.UID, p.netns) {
		// The sandbox was recreated (same pod, new netns) and its DEL was
		// missed: start over with the new namespace.
		n.log.Info("pod sandbox changed; re-enrolling in the new netns", zap.String("uid", info.UID))
		n.mu.Lock()
		delete(n.pods, info.UID)
		n.mu.Unlock()
		p.netns.Close()
		p = nil
	}
	if p != nil {
		netns = p.netns
	} else {
		f, err := n.openNetns(info)
		if err != nil {
			return StatusFailed, fmt.Errorf("pod %s/%s: network namespace: %w", info.Namespace, info.Name, err)
		}
		netns, fresh = f, true
	}
	cfg := capture.Config{ProbeSources: n.probeSources(info.IPs), ProbePorts: info.ProbePorts}
	if err := podns.Do(netns, func() error { return capture.Install(cfg) }); err != nil {
		if fresh {
			netns.Close()
		}
		return StatusFailed, fmt.Errorf("pod %s/%s: %w", info.Namespace, info.Name, err)
	}
	n.mu.Lock()
	if p == nil {
		p = &pod{netns: netns}
		n.pods[info.UID] = p
	}
	changed := !p.info.equal(info)
	p.info, p.capture = info, cfg
	acked := p.acked && !changed
	n.mu.Unlock()
	if acked {
		return StatusEnabled, nil
	}
	if n.zds == nil {
		return StatusPending, zdsserver.ErrNoZtunnel
	}
	if err := n.zds.Add(ctx, info.workload(n.name, netns)); err != nil {
		return StatusPending, fmt.Errorf("pod %s/%s: hand-off to ztunnel: %w", info.Namespace, info.Name, err)
	}
	n.mu.Lock()
	p.acked = true
	n.mu.Unlock()
	n.log.Info("pod enrolled", zap.String("pod", info.Namespace+"/"+info.Name), zap.String("uid", info.UID))
	return StatusEnabled, nil
}

// Unenroll removes a pod's capture rules and tells ztunnel to drop it. It
// is idempotent.
func (n *Node) Unenroll(ctx context.Context, uid string) error {
	n.op.Lock()
	defer n.op.Unlock()
	n.mu.Lock()
	p := n.pods[uid]
	n.mu.Unlock()
	if p == nil {
		return nil
	}
	var errs []error
	if err := podns.Do(p.netns, capture.Remove); err != nil {
		errs = append(errs, err)
	}
	if n.zds != nil {
		if err := n.zds.Delete(ctx, uid); err != nil && !errors.Is(err, zdsserver.ErrNoZtunnel) {
			// ztunnel will not get this pod in its next snapshot either.
			n.log.Warn("ztunnel did not acknowledge a delete", zap.String("uid", uid), zap.Error(err))
		}
	}
	n.mu.Lock()
	delete(n.pods, uid)
	n.mu.Unlock()
	p.netns.Close()
	n.log.Info("pod unenrolled", zap.String("pod", p.info.Namespace+"/"+p.info.Name), zap.String("uid", uid))
	return errors.Join(errs...)
}

// Release removes capture rules that an earlier run of the agent left in
// a pod it does not hold (the pod has since left the mesh), and tells
// ztunnel to drop it. A pod whose netns cannot be found has nothing left
// to release.
func (n *Node) Release(ctx context.Context, info PodInfo) error {
	n.op.Lock()
	defer n.op.Unlock()
	f, err := n.openNetns(info)
	if errors.Is(err, podns.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if err := podns.Do(f, capture.Remove); err != nil {
		return fmt.Errorf("pod %s/%s: %w", info.Namespace, info.Name, err)
	}
	if n.zds != nil {
		if err := n.zds.Delete(ctx, info.UID); err != nil && !errors.Is(err, zdsserver.ErrNoZtunnel) {
			n.log.Warn("ztunnel did not acknowledge a delete", zap.String("uid", info.UID), zap.Error(err))
		}
	}
	n.log.Info("released pod left enrolled by an earlier run", zap.String("pod", info.Namespace+"/"+info.Name))
	return nil
}

// Close releases every namespace the node holds (the agent is stopping;
// the rules stay in place and ztunnel keeps serving the pods).
func (n *Node) Close() {
	n.op.Lock()
	defer n.op.Unlock()
	n.mu.Lock()
	defer n.mu.Unlock()
	for uid, p := range n.pods {
		p.netns.Close()
		delete(n.pods, uid)
	}
}

// Forget handles a pod's sandbox going away (CNI DEL): unenrol and drop
// the recorded sandbox.
func (n *Node) Forget(ctx context.Context, uid string) error {
	err := n.Unenroll(ctx, uid)
	n.mu.Lock()
	delete(n.sandboxes, uid)
	n.mu.Unlock()
	return err
}

// Check verifies that an enrolled pod's rules are intact and ztunnel has
// it.
func (n *Node) Check(uid string) error {
	n.mu.Lock()
	p := n.pods[uid]
	var cfg capture.Config
	var acked bool
	if p != nil {
		cfg, acked = p.capture, p.acked
	}
	n.mu.Unlock()
	if p == nil {
		return errors.New("pod is not enrolled on this node")
	}
	if err := podns.Do(p.netns, func() error { return capture.Check(cfg) }); err != nil {
		return err
	}
	if !acked {
		return errors.New("ztunnel has not acknowledged the pod")
	}
	return nil
}
