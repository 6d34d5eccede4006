package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

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

// leavePoll is how often a leaving pod's connections are checked.
const leavePoll = 500 * time.Millisecond

// leaving is a pod that left the mesh while connections of it went
// through ztunnel: its capture rules stay, in their draining form, until
// those connections are over (see capture.Drain).
type leaving struct {
	cancel context.CancelFunc
	done   chan struct{}
}

type pod struct {
	info    PodInfo
	netns   *os.File
	capture capture.Config
	acked   bool
	// awaiting: adopted (Adopt) and not acknowledged: the next snapshot
	// hands it to ztunnel, and its answer (SnapshotResult) decides.
	awaiting bool
}

// Node holds the enrolled pods of this node and performs enrolment:
// capture rules inside the pod's netns, then the hand-off to ztunnel.
type Node struct {
	log       *zap.Logger
	zds       *zdsserver.Server
	name      string
	procRoot  string
	hostNetns string // path of the node's netns ("" = the agent's own)

	leaveTimeout time.Duration
	// notify hears of a pod whose hand-off a ztunnel answered outside
	// Enroll (in a snapshot): acknowledged, or refused (to retry).
	notify func(info PodInfo, acked bool)

	op sync.Mutex // serialises Enroll/Unenroll

	mu        sync.Mutex
	pods      map[string]*pod     // by UID: pods whose rules are installed
	sandboxes map[string]sandbox  // by UID: the sandbox of the pod's last CNI ADD
	leaving   map[string]*leaving // by UID: pods draining out of the mesh
	wg        sync.WaitGroup      // leaving pods' goroutines
}

// sandbox is what a CNI ADD reported about a pod's sandbox.
type sandbox struct {
	containerID string
	netns       string // path
}

// NewNode allocates a Node. leaveTimeout bounds how long a pod leaving
// the mesh keeps its connections through ztunnel.
func NewNode(log *zap.Logger, zds *zdsserver.Server, nodeName, procRoot, hostNetns string, leaveTimeout time.Duration) *Node {
	return &Node{log: log, zds: zds, name: nodeName, procRoot: procRoot, hostNetns: hostNetns, leaveTimeout: leaveTimeout,
		pods: map[string]*pod{}, sandboxes: map[string]sandbox{}, leaving: map[string]*leaving{}}
}

// SetZDS sets the ZDS server (wiring: the server needs Snapshot first).
func (n *Node) SetZDS(z *zdsserver.Server) { n.zds = z }

// SetNotify sets the function told about snapshot answers (wiring, before
// the ZDS server runs).
func (n *Node) SetNotify(f func(info PodInfo, acked bool)) { n.notify = f }

// SnapshotResult records ztunnel's answer to a pod of a snapshot
// (zdsserver.Config.SnapshotResult): acknowledged, the pod is enabled
// without another add; refused, it is pending and retried.
func (n *Node) SnapshotResult(w zdsserver.Workload, err error) {
	n.mu.Lock()
	p := n.pods[w.UID]
	if p == nil || p.netns != w.Netns {
		n.mu.Unlock()
		return // unenrolled or re-enrolled meanwhile
	}
	p.acked, p.awaiting = err == nil, false
	info := p.info
	n.mu.Unlock()
	if err != nil {
		n.log.Warn("ztunnel refused a pod in its snapshot; retrying", zap.String("pod", info.Namespace+"/"+info.Name), zap.Error(err))
	}
	if n.notify != nil {
		n.notify(info, err == nil)
	}
}

// AwaitingSnapshot reports whether a pod was adopted and waits for a
// ztunnel snapshot to hand it over (until then the watcher adopts it
// again rather than sending an add of its own).
func (n *Node) AwaitingSnapshot(uid string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	p := n.pods[uid]
	return p != nil && p.awaiting
}

// Unacknowledged counts the pods whose rules are in place but that no
// ztunnel has acknowledged (not connected yet, or refused them).
func (n *Node) Unacknowledged() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, p := range n.pods {
		if !p.acked {
			c++
		}
	}
	return c
}

// RecordSandbox remembers the sandbox (container ID and netns path) a CNI
// ADD reported for a pod: the pod's current sandbox from now on.
func (n *Node) RecordSandbox(uid, containerID, netnsPath string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.sandboxes[uid] = sandbox{containerID: containerID, netns: netnsPath}
}

// SandboxOwner returns the pod whose current sandbox (per its last CNI
// ADD) is containerID.
func (n *Node) SandboxOwner(containerID string) (string, bool) {
	if containerID == "" {
		return "", false
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	for uid, sb := range n.sandboxes {
		if sb.containerID == containerID {
			return uid, true
		}
	}
	return "", false
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
	return n.enroll(ctx, info, true)
}

// Adopt is Enroll without the hand-off: the pod is recorded, with its
// rules in place, and goes to ztunnel in the next snapshot (whose answer
// SnapshotResult records). It serves the agent's first pass after a
// restart, before any ztunnel can be connected: the pods ztunnel already
// serves are confirmed by the snapshot, with no second add and no
// interim "pending". The status is enabled only for a pod already
// acknowledged, else pending (with a nil error).
func (n *Node) Adopt(ctx context.Context, info PodInfo) (Status, error) {
	return n.enroll(ctx, info, false)
}

func (n *Node) enroll(ctx context.Context, info PodInfo, handOff bool) (Status, error) {
	n.op.Lock()
	defer n.op.Unlock()
	// Back in the mesh while leaving it: Install below replaces the
	// draining rules (connections still captured stay so).
	n.stopLeaving(info.UID)
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
	if !p.info.equal(info) {
		p.acked = false // ztunnel must hear of the change
	}
	p.info, p.capture = info, cfg
	acked := p.acked
	n.mu.Unlock()
	if acked {
		return StatusEnabled, nil
	}
	if !handOff {
		n.mu.Lock()
		p.awaiting = !p.acked
		n.mu.Unlock()
		return StatusPending, nil
	}
	if n.zds == nil {
		return StatusPending, zdsserver.ErrNoZtunnel
	}
	if err := n.zds.Add(ctx, info.workload(n.name, netns)); err != nil {
		return StatusPending, fmt.Errorf("pod %s/%s: hand-off to ztunnel: %w", info.Namespace, info.Name, err)
	}
	n.mu.Lock()
	p.acked, p.awaiting = true, false
	n.mu.Unlock()
	n.log.Info("pod enrolled", zap.String("pod", info.Namespace+"/"+info.Name), zap.String("uid", info.UID))
	return StatusEnabled, nil
}

// Unenroll takes a pod out of the mesh and tells ztunnel to drop it. It
// is idempotent. New connections are no longer captured at once; the
// capture rules themselves go when the pod's connections through ztunnel
// are over (ztunnel drains them), or after the leave timeout, when the
// rest are reset: removed earlier, they would let those connections'
// packets out untranslated, in plaintext.
func (n *Node) Unenroll(ctx context.Context, uid string) error {
	return n.unenroll(ctx, uid, true)
}

// unenroll is Unenroll; without drain the rules go at once.
func (n *Node) unenroll(ctx context.Context, uid string, drain bool) error {
	n.op.Lock()
	defer n.op.Unlock()
	n.mu.Lock()
	p := n.pods[uid]
	delete(n.pods, uid)
	n.mu.Unlock()
	if p == nil {
		return nil
	}
	name := p.info.Namespace + "/" + p.info.Name
	var err error
	if drain {
		err = n.leave(ctx, uid, name, p.netns)
	} else {
		err = podns.Do(p.netns, capture.Remove)
		n.zdsDelete(ctx, uid)
		p.netns.Close()
	}
	n.log.Info("pod unenrolled", zap.String("pod", name), zap.String("uid", uid))
	return err
}

func (n *Node) zdsDelete(ctx context.Context, uid string) {
	if n.zds == nil {
		return
	}
	if err := n.zds.Delete(ctx, uid); err != nil && !errors.Is(err, zdsserver.ErrNoZtunnel) {
		// ztunnel will not get this pod in its next snapshot either.
		n.log.Warn("ztunnel did not acknowledge a delete", zap.String("uid", uid), zap.Error(err))
	}
}

// leave drains the capture rules in netns, tells ztunnel to drop the pod
// and removes the rules — at once when no connection of the pod may go
// through ztunnel, else once they are over, in the background. It takes
// ownership of netns.
func (n *Node) leave(ctx context.Context, uid, name string, netns *os.File) error {
	var conns []capture.Conn
	derr := podns.Do(netns, func() (err error) {
		conns, err = capture.Drain()
		return err
	})
	n.zdsDelete(ctx, uid)
	if derr == nil && len(conns) == 0 {
		err := podns.Do(netns, capture.Remove)
		netns.Close()
		return err
	}
	if derr != nil {
		// Which connections go through ztunnel is unknown: keep the rules
		// for the whole leave timeout, then remove them.
		n.log.Warn("draining a leaving pod's capture rules; removing them after the leave timeout",
			zap.String("pod", name), zap.Duration("timeout", n.leaveTimeout), zap.Error(derr))
		conns = nil
	} else {
		n.log.Info("pod left the mesh; its rules stay until its connections through ztunnel end",
			zap.String("pod", name), zap.Int("connections", len(conns)), zap.Duration("timeout", n.leaveTimeout))
	}
	lctx, cancel := context.WithCancel(context.Background())
	l := &leaving{cancel: cancel, done: make(chan struct{})}
	n.mu.Lock()
	n.leaving[uid] = l
	n.mu.Unlock()
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		defer close(l.done)
		defer netns.Close()
		n.finishLeaving(lctx, name, netns, conns, derr != nil)
		n.mu.Lock()
		if n.leaving[uid] == l {
			delete(n.leaving, uid)
		}
		n.mu.Unlock()
	}()
	return nil
}

// finishLeaving waits for a leaving pod's connections through ztunnel to
// end, resets those left at the leave timeout, then removes the rules;
// with unknown connections it waits for the whole leave timeout. When ctx
// ends first, the rules stay in their draining form.
func (n *Node) finishLeaving(ctx context.Context, name string, netns *os.File, conns []capture.Conn, unknown bool) {
	log := n.log.With(zap.String("pod", name))
	deadline := time.Now().Add(n.leaveTimeout)
	if unknown {
		t := time.NewTimer(n.leaveTimeout)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := podns.Do(netns, capture.Remove); err != nil {
			log.Warn("removing a leaving pod's capture rules", zap.Error(err))
		}
		return
	}
	canReset := true
	for {
		var left []capture.Conn
		err := podns.Do(netns, func() (err error) {
			left, err = capture.StillOpen(conns)
			return err
		})
		switch {
		case err != nil:
			log.Warn("listing a leaving pod's connections", zap.Error(err))
		case len(left) == 0:
			if err := podns.Do(netns, capture.Remove); err != nil {
				log.Warn("removing a leaving pod's capture rules", zap.Error(err))
				return
			}
			log.Info("pod's connections through ztunnel are over; capture rules removed")
			return
		case canReset && time.Now().After(deadline):
			err := podns.Do(netns, func() error { return capture.Reset(left) })
			if errors.Is(err, capture.ErrResetUnsupported) {
				// Fail closed: the rules stay until the connections end.
				log.Warn("the kernel cannot reset sockets; the capture rules stay until the pod's connections through ztunnel end",
					zap.Int("connections", len(left)))
				canReset = false
			} else if err != nil {
				log.Warn("resetting a leaving pod's connections", zap.Error(err))
			} else {
				log.Info("leave timeout: reset the pod's connections through ztunnel", zap.Int("connections", len(left)))
			}
			conns = left
			continue
		default:
			conns = left
		}
		t := time.NewTimer(leavePoll)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// stopLeaving ends the wait of a pod leaving the mesh (its rules stay as
// they are) and returns once it is over.
func (n *Node) stopLeaving(uid string) {
	n.mu.Lock()
	l := n.leaving[uid]
	delete(n.leaving, uid)
	n.mu.Unlock()
	if l != nil {
		l.cancel()
		<-l.done
	}
}

// Leaving counts the pods that left the mesh and wait for their
// connections through ztunnel to end.
func (n *Node) Leaving() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.leaving)
}

// Release removes capture rules that an earlier run of the agent left in
// a pod it does not hold (the pod has since left the mesh), and tells
// ztunnel to drop it, as Unenroll does. A pod whose netns cannot be found
// has nothing left to release.
func (n *Node) Release(ctx context.Context, info PodInfo) error {
	n.op.Lock()
	defer n.op.Unlock()
	if n.isLeaving(info.UID) {
		return nil
	}
	f, err := n.openNetns(info)
	if errors.Is(err, podns.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := n.leave(ctx, info.UID, info.Namespace+"/"+info.Name, f); err != nil {
		return fmt.Errorf("pod %s/%s: %w", info.Namespace, info.Name, err)
	}
	n.log.Info("released pod left enrolled by an earlier run", zap.String("pod", info.Namespace+"/"+info.Name))
	return nil
}

func (n *Node) isLeaving(uid string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.leaving[uid] != nil
}

// Close releases every namespace the node holds (the agent is stopping;
// the rules stay in place and ztunnel keeps serving the pods; the rules
// of leaving pods stay in their draining form) and returns once the
// goroutines of leaving pods have exited.
func (n *Node) Close() {
	n.op.Lock()
	defer n.op.Unlock()
	n.mu.Lock()
	for uid, p := range n.pods {
		p.netns.Close()
		delete(n.pods, uid)
	}
	for _, l := range n.leaving {
		l.cancel()
	}
	n.mu.Unlock()
	n.wg.Wait()
}

// Forget handles a pod's sandbox going away (CNI DEL): unenrol and drop
// the recorded sandbox. Its processes are gone, and with them the
// application sockets that could leak: the rules go at once (also those
// of a pod that was leaving the mesh).
func (n *Node) Forget(ctx context.Context, uid string) error {
	n.stopLeaving(uid)
	err := n.unenroll(ctx, uid, false)
	n.mu.Lock()
	delete(n.sandboxes, uid)
	n.mu.Unlock()
	return err
}

// Gone handles a pod whose object was deleted before its sandbox's CNI
// DEL arrived: it leaves the mesh as Unenroll does (its processes may
// still run), and the recorded sandbox is dropped.
func (n *Node) Gone(ctx context.Context, uid string) error {
	err := n.unenroll(ctx, uid, true)
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
