package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/amesh-dev/amesh/cni-plugin/internal/agentapi"
)

// cniHandler answers the amesh-cni plugin (agentapi.Handler).
type cniHandler struct {
	log     *zap.Logger
	node    *Node
	watch   *Watcher
	exclude []string
}

var _ agentapi.Handler = (*cniHandler)(nil)

func (h *cniHandler) Ready() error {
	if !h.watch.Synced() {
		return fmt.Errorf("%w: kubernetes caches not synced", agentapi.ErrNotReady)
	}
	return nil
}

func parseIPs(ss []string) ([]netip.Addr, error) {
	var ips []netip.Addr
	for _, s := range ss {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("pod IP %q: %w", s, err)
		}
		ips = append(ips, a.Unmap())
	}
	return ips, nil
}

// decide looks the pod up and tells whether it is enrolled.
func (h *cniHandler) decide(ctx context.Context, r *agentapi.PodRequest) (*corev1.Pod, bool, error) {
	if err := h.Ready(); err != nil {
		return nil, false, err
	}
	p, ns, err := h.watch.lookup(ctx, r.PodNamespace, r.PodName, r.PodUID)
	if err != nil {
		return nil, false, err
	}
	if p == nil {
		// No pod object (e.g. a static pod without its mirror yet): decide
		// by the namespace alone.
		p = &corev1.Pod{}
		p.Name, p.Namespace = r.PodName, r.PodNamespace
		p.UID = types.UID("cni-" + r.ContainerID)
	}
	return p, ShouldEnroll(p, ns, h.exclude), nil
}

func (h *cniHandler) Add(ctx context.Context, r *agentapi.PodRequest) (bool, error) {
	p, enrolled, err := h.decide(ctx, r)
	if err != nil {
		return false, err
	}
	// Remember every pod's current sandbox: a pod enrolled later (its
	// namespace labelled while it runs) is found without scanning /proc,
	// and a late DEL of a replaced sandbox is told apart (Del).
	if r.Netns != "" {
		h.node.RecordSandbox(string(p.UID), r.ContainerID, r.Netns)
	}
	if !enrolled {
		return false, nil
	}
	ips, err := parseIPs(r.IPs)
	if err != nil {
		return true, err
	}
	if len(ips) == 0 {
		return true, errors.New("enrolled pod has no IP in prevResult")
	}
	info := podInfo(p, ips)
	st, err := h.node.Enroll(ctx, info)
	h.watch.Enqueue(p.Namespace, p.Name) // annotate
	if err != nil {
		return true, fmt.Errorf("redirection %s: %w", st, err)
	}
	return true, nil
}

// uidFor names the pod a CNI request concerns: the pod whose current
// sandbox it is, else the pod of the runtime's K8S_POD_UID (or the mirror
// pod of that static pod, which is what the agent enrolled). The name
// decides only when the runtime passes no UID: a late DEL of a replaced
// pod's sandbox (a StatefulSet pod force-deleted and recreated under the
// same name) must not touch the new pod.
func (h *cniHandler) uidFor(ctx context.Context, r *agentapi.PodRequest) string {
	if uid, ok := h.node.SandboxOwner(r.ContainerID); ok {
		return uid
	}
	enrolled := h.node.Enrolled()
	if r.PodUID != "" {
		if _, ok := enrolled[r.PodUID]; ok {
			return r.PodUID
		}
		if p, _, err := h.watch.lookup(ctx, r.PodNamespace, r.PodName, r.PodUID); err == nil && p != nil {
			return string(p.UID) // the mirror of a static pod
		}
		return r.PodUID
	}
	for uid, info := range enrolled {
		if info.Namespace == r.PodNamespace && info.Name == r.PodName {
			return uid
		}
	}
	if p, _, err := h.watch.lookup(ctx, r.PodNamespace, r.PodName, ""); err == nil && p != nil {
		return string(p.UID)
	}
	return ""
}

func (h *cniHandler) Del(ctx context.Context, r *agentapi.PodRequest) error {
	uid := h.uidFor(ctx, r)
	if uid == "" {
		return nil
	}
	if h.node.StaleSandbox(uid, r.ContainerID) {
		// The runtime replaced this sandbox and the pod now runs in a new
		// one, whose redirection must stay in place: this DEL concerns a
		// namespace the agent no longer holds.
		h.log.Info("CNI DEL of a replaced sandbox; the pod's current sandbox keeps its redirection",
			zap.String("pod", r.PodNamespace+"/"+r.PodName), zap.String("container", r.ContainerID))
		return nil
	}
	if err := h.node.Forget(ctx, uid); err != nil {
		// The sandbox is going away regardless; report, do not block DEL.
		h.log.Warn("cleanup on CNI DEL", zap.String("pod", r.PodNamespace+"/"+r.PodName), zap.Error(err))
	}
	return nil
}

func (h *cniHandler) Check(ctx context.Context, r *agentapi.PodRequest) (bool, error) {
	_, enrolled, err := h.decide(ctx, r)
	if err != nil || !enrolled {
		return false, err
	}
	uid := h.uidFor(ctx, r)
	if err := h.node.Check(uid); err != nil {
		return true, err
	}
	return true, nil
}
