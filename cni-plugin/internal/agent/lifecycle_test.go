package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"

	"github.com/amesh-dev/amesh/api/capture"
	"github.com/amesh-dev/amesh/cni-plugin/internal/ztunneltest"
)

// enrolRunning creates a pod in nsName, runs the CNI ADD, starts a
// process in its netns, reports it running and waits until it is enabled.
func (h *harness) enrolRunning(nsName, name string) *testPod {
	h.t.Helper()
	p := h.pod(nsName, name, nil)
	if err := h.add(p); err != nil {
		h.t.Fatalf("ADD %s: %v", name, err)
	}
	h.runIn(p)
	h.setRunning(p)
	h.wantAnnotation(p, "enabled")
	return p
}

// wantCaptured asserts that a new outbound connection of p lands on ztunnel.
func (h *harness) wantCaptured(p *testPod, port int) {
	h.t.Helper()
	got, err := h.dialOut(p, port)
	if want := "ztunnel " + netip.AddrPortFrom(h.gw, uint16(port)).String(); err != nil || got != want {
		h.t.Fatalf("%s → node:%d: %q, %v; want %q (captured)", p.Name, port, got, err, want)
	}
}

// setPhase sets the pod's status phase, as the kubelet would.
func (h *harness) setPhase(p *testPod, phase corev1.PodPhase) {
	h.t.Helper()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := h.k8s.CoreV1().Pods(p.Namespace).Get(context.Background(), p.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		cur.Status.Phase = phase
		_, err = h.k8s.CoreV1().Pods(p.Namespace).UpdateStatus(context.Background(), cur, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		h.t.Fatal(err)
	}
}

// TestTerminatingPodStaysEnrolled: a pod whose deletion has started keeps
// running for its grace period (its app still accepts and opens
// connections). It must stay in the mesh until it is really over — its
// sandbox's CNI DEL, a terminal phase, or the pod object gone: leaving at
// the deletion timestamp would let new inbound plaintext reach the app
// around STRICT mTLS and L4 authorization, and new outbound connections
// leave in clear text.
func TestTerminatingPodStaysEnrolled(t *testing.T) {
	h := newHarness(t)
	h.startAgent()
	z := h.ztunnel()
	nsName := h.namespace("terminating", true)
	ctx := context.Background()

	p := h.enrolRunning(nsName, "p")
	q := h.enrolRunning(nsName, "q")
	for _, x := range []*testPod{p, q} {
		if err := z.Expect("add "+string(x.UID), 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}

	// Deletion starts (graceful: the object stays, with a deletion
	// timestamp, while the kubelet stops the containers).
	grace := int64(300)
	for _, x := range []*testPod{p, q} {
		if err := h.k8s.CoreV1().Pods(nsName).Delete(ctx, x.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
			t.Fatal(err)
		}
		cur, err := h.k8s.CoreV1().Pods(nsName).Get(ctx, x.Name, metav1.GetOptions{})
		if err != nil || cur.DeletionTimestamp == nil {
			t.Fatalf("pod %s after a graceful delete: %v, %v; want it terminating", x.Name, cur, err)
		}
	}
	if err := z.Expect("delete "+string(p.UID), 2*time.Second); err == nil {
		t.Fatal("ztunnel was told to drop a pod whose deletion merely started")
	}
	for _, x := range []*testPod{p, q} {
		h.wantRules(x) // the full rules, not their draining form
		h.wantCaptured(x, 9999)
		if got := h.annotation(x); got != "enabled" {
			t.Fatalf("%s: annotation %q while terminating, want enabled", x.Name, got)
		}
		if !z.Serving(string(x.UID)) {
			t.Fatalf("ztunnel stopped serving %s while it terminates", x.Name)
		}
	}

	// Really over: p's sandbox goes (CNI DEL) — rules gone at once;
	// q's containers ended (phase Failed) — it leaves the mesh.
	if err := h.del(p); err != nil {
		t.Fatal(err)
	}
	h.wantNoRules(p)
	if err := z.Expect("delete "+string(p.UID), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	h.setPhase(q, corev1.PodFailed)
	h.eventually("ztunnel dropped q", func() error {
		if z.Serving(string(q.UID)) {
			return errors.New("still served")
		}
		return nil
	})
	h.wantNoRulesEventually(q)

	// DEL stays idempotent on a pod already gone from the mesh.
	if err := h.del(p); err != nil {
		t.Fatalf("second DEL: %v", err)
	}
}

func (h *harness) wantNoRulesEventually(p *testPod) {
	h.t.Helper()
	h.eventually("no rules in "+p.Name, func() error {
		if err := h.rules(p); !errors.Is(err, capture.ErrNotInstalled) {
			return fmt.Errorf("Check = %v", err)
		}
		return nil
	})
}

// TestLateDelAfterPodReplaced: a StatefulSet pod is force-deleted and
// recreated under the same name on the same node; the agent restarts
// (it remembers no sandbox); then the CNI DEL of the old pod's sandbox
// arrives, late. It names the old pod's UID: the new pod, enrolled under
// the same namespace/name, must keep its rules and stay served.
func TestLateDelAfterPodReplaced(t *testing.T) {
	h := newHarness(t)
	h.startAgent()
	z := h.ztunnel()
	nsName := h.namespace("sts", true)
	ctx := context.Background()

	old := h.pod(nsName, "web-0", nil)
	if err := h.add(old); err != nil {
		t.Fatal(err)
	}
	h.wantRules(old)
	zero := int64(0)
	if err := h.k8s.CoreV1().Pods(nsName).Delete(ctx, old.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	h.wantNoRulesEventually(old) // its object is gone: it left the mesh

	cur := h.enrolRunning(nsName, "web-0")
	if cur.UID == old.UID {
		t.Fatal("the recreated pod has the old UID")
	}
	h.stopAgent()
	z.Close()
	h.startAgent()
	z2, err := ztunneltest.Dial(h.cfg.ZDSSocket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(z2.Close)
	if err := z2.Expect("snapshot_sent", 15*time.Second); err != nil {
		t.Fatal(err)
	}
	if !z2.Serving(string(cur.UID)) {
		t.Fatal("the restarted agent did not hand the current pod to ztunnel")
	}

	// The old sandbox's DEL, late.
	if err := h.del(old); err != nil {
		t.Fatalf("late DEL: %v", err)
	}
	h.wantRules(cur)
	if err := z2.Expect("delete "+string(cur.UID), 500*time.Millisecond); err == nil {
		t.Fatal("ztunnel was told to drop the current pod on the old pod's DEL")
	}
	h.wantCaptured(cur, 9999)
	h.wantAnnotation(cur, "enabled")

	// The current pod's own DEL still cleans up.
	if err := h.del(cur); err != nil {
		t.Fatal(err)
	}
	h.wantNoRules(cur)
}
