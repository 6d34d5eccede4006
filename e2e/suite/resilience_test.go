//go:build e2e

package suite

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
	"github.com/amesh-dev/amesh/e2e/internal/mesh"
	"github.com/amesh-dev/amesh/e2e/internal/wire"
	"github.com/amesh-dev/amesh/e2e/sample"
)

// restartPod deletes the pod of a DaemonSet or Deployment (selector in
// amesh-system) on node ("" = any) and waits until its replacement is
// Ready; it returns the replacement.
func restartPod(ctx context.Context, t *testing.T, selector, node string) *corev1.Pod {
	t.Helper()
	c := shared.c
	pods, err := c.Pods(ctx, mesh.SystemNamespace, selector)
	if err != nil {
		t.Fatal(err)
	}
	var old *corev1.Pod
	for i := range pods {
		if node == "" || pods[i].Spec.NodeName == node {
			old = &pods[i]
			break
		}
	}
	if old == nil {
		t.Fatalf("no %s pod on node %q", selector, node)
	}
	t.Logf("deleting %s on %s", old.Name, old.Spec.NodeName)
	if err := c.Core.CoreV1().Pods(mesh.SystemNamespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	var repl *corev1.Pod
	err = kube.Poll(ctx, 200*time.Millisecond, 2*time.Minute, func(ctx context.Context) (bool, error) {
		pods, err := c.Pods(ctx, mesh.SystemNamespace, selector)
		if err != nil {
			return false, err
		}
		for i := range pods {
			p := &pods[i]
			if p.UID != old.UID && (node == "" || p.Spec.NodeName == node) && kube.Ready(p) {
				repl = p
				return true, nil
			}
		}
		return false, fmt.Errorf("no ready replacement of %s yet", old.Name)
	})
	if err != nil {
		t.Fatal(err)
	}
	return repl
}

// startedAt is when a pod's first container last started.
func startedAt(p *corev1.Pod) time.Time {
	for _, s := range p.Status.ContainerStatuses {
		if s.State.Running != nil {
			return s.State.Running.StartedAt.Time
		}
	}
	return time.Time{}
}

// probe is one request of a probe loop.
type probe struct {
	at time.Time
	ok bool
}

// probeLoop sends one request (a new connection) every interval until
// ctx ends and returns the outcomes in order.
func probeLoop(ctx context.Context, d *mesh.Driver, target string, interval time.Duration) func() []probe {
	var mu sync.Mutex
	var out []probe
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for ctx.Err() == nil {
			start := time.Now()
			r, err := d.Run(ctx, url.Values{"url": {target}, "n": {"1"}, "timeout": {"1s"}})
			if ctx.Err() != nil {
				return
			}
			mu.Lock()
			out = append(out, probe{at: start, ok: err == nil && r.OK == 1})
			mu.Unlock()
			select {
			case <-ctx.Done():
			case <-tick.C:
			}
		}
	}()
	return func() []probe {
		<-done
		mu.Lock()
		defer mu.Unlock()
		return out
	}
}

// assertNoPlaintext fails if any captured connection between the pods
// went anywhere but the HBONE port, or carried anything but TLS.
func assertNoPlaintext(t *testing.T, segs []wire.Segment, marker string) {
	t.Helper()
	conns := wire.Conns(segs)
	for _, cn := range conns {
		if cn.Server.Port() != mesh.PortHBONE {
			t.Errorf("connection %s → %s bypassed ztunnel (not to :%d)", cn.Client, cn.Server, mesh.PortHBONE)
		}
		for dir, b := range map[string][]byte{"up": cn.Up, "down": cn.Down} {
			if marker != "" && bytes.Contains(b, []byte(marker)) {
				t.Errorf("connection %s → %s (%s): marker in clear text", cn.Client, cn.Server, dir)
			}
			if _, err := wire.TLSConn(cn, b); err != nil {
				t.Errorf("connection %s → %s (%s, SYN seen %t): not TLS: %v", cn.Client, cn.Server, dir, cn.Handshake, err)
			}
		}
	}
	if len(conns) == 0 {
		t.Error("captured no connection at all")
	}
}

// TestZtunnelRestart: while the client node's ztunnel restarts, new
// connections fail closed (never in plaintext: the capture on the server's
// node shows only TLS to the HBONE port), and they work again within 2 s of
// the new ztunnel starting.
func TestZtunnelRestart(t *testing.T) {
	p := newPair(t, "ztrestart", true)
	ctx := ctxFor(t, 4*time.Minute)
	c := shared.c
	if err := mesh.WaitRedirection(ctx, c, p.ns, "", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	clientPod, serverPod := pod(t, p.ns, p.client), pod(t, p.ns, p.server)
	tool, err := mesh.CaptureNode(ctx, c, p.ns, serverPod.Spec.NodeName)
	if err != nil {
		t.Fatal(err)
	}
	d := driver(t, p.ns, p.client)
	capture, err := mesh.StartCapture(ctx, c, p.ns, tool,
		fmt.Sprintf("tcp and host %s and host %s", clientPod.Status.PodIP, serverPod.Status.PodIP), 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	marker := "amesh-marker-" + randSuffix()
	target := p.url("/echo?" + marker)
	lctx, stopLoop := context.WithCancel(ctx)
	results := probeLoop(lctx, d, target, 100*time.Millisecond)
	time.Sleep(2 * time.Second)
	repl := restartPod(ctx, t, "app=ztunnel", clientPod.Spec.NodeName)
	started := startedAt(repl)
	time.Sleep(5 * time.Second)
	stopLoop()
	probes := results()
	segs, err := capture.Stop(ctx)
	if err != nil {
		t.Fatal(err)
	}

	var firstFail, lastFail time.Time
	fails := 0
	for _, pr := range probes {
		if !pr.ok {
			fails++
			if firstFail.IsZero() {
				firstFail = pr.at
			}
			lastFail = pr.at
		}
	}
	t.Logf("%d probes, %d failed (%s → %s); new ztunnel started %s", len(probes), fails,
		firstFail.Format(time.StampMilli), lastFail.Format(time.StampMilli), started.Format(time.StampMilli))
	if len(probes) < 20 || !probes[len(probes)-1].ok {
		t.Fatalf("traffic did not come back: %d probes, last ok=%t", len(probes), len(probes) > 0 && probes[len(probes)-1].ok)
	}
	// startedAt has a resolution of 1 s: allow for it.
	if fails > 0 {
		if rec := lastFail.Sub(started); rec > 3*time.Second {
			t.Errorf("new connections failed until %.1fs after the new ztunnel started, want ≤ 2s", rec.Seconds())
		}
	}
	assertNoPlaintext(t, segs, marker)
}

// rolloutRestart restarts a DaemonSet in amesh-system as `kubectl rollout
// restart` does (a new template annotation) and waits until every node
// runs a ready pod of the new revision and the old pods are gone.
func rolloutRestart(ctx context.Context, t *testing.T, name string) {
	t.Helper()
	c := shared.c
	ds, err := c.Core.AppsV1().DaemonSets(mesh.SystemNamespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	old := map[string]bool{}
	pods, err := c.Pods(ctx, mesh.SystemNamespace, metav1.FormatLabelSelector(ds.Spec.Selector))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		old[string(p.UID)] = true
	}
	t.Logf("rollout restart of daemonset %s (%d pods)", name, len(old))
	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":%q}}}}}`, time.Now().Format(time.RFC3339Nano))
	if _, err := c.Core.AppsV1().DaemonSets(mesh.SystemNamespace).Patch(ctx, name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitDaemonSet(ctx, mesh.SystemNamespace, name, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	err = kube.Poll(ctx, 200*time.Millisecond, 2*time.Minute, func(ctx context.Context) (bool, error) {
		pods, err := c.Pods(ctx, mesh.SystemNamespace, metav1.FormatLabelSelector(ds.Spec.Selector))
		if err != nil {
			return false, err
		}
		for _, p := range pods {
			if old[string(p.UID)] {
				return false, fmt.Errorf("old pod %s still there (%s)", p.Name, p.Status.Phase)
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestZtunnelRestartWithLiveConnection is TestZtunnelRestart while a long
// request is in flight through the restarting ztunnel, for both ways a
// ztunnel is replaced: a rolling update of the DaemonSet (every node, the
// new ztunnel surges beside the old one) and the deletion of the client
// node's ztunnel pod (its replacement surges at once). The request is
// drained to completion by the old ztunnel, and new connections fail for
// no more than 2 s (none at all in a rolling update: the new ztunnel
// listens before the old one stops).
func TestZtunnelRestartWithLiveConnection(t *testing.T) {
	knownGap(t)
	for _, tc := range []struct {
		name     string
		maxFails int // new connections allowed to fail (-1: no limit but the 2 s gap)
		restart  func(ctx context.Context, t *testing.T, node string)
	}{
		{"rollout", 0, func(ctx context.Context, t *testing.T, _ string) { rolloutRestart(ctx, t, "ztunnel") }},
		{"delete", -1, func(ctx context.Context, t *testing.T, node string) { restartPod(ctx, t, "app=ztunnel", node) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPair(t, "ztlive", true)
			ctx := ctxFor(t, 4*time.Minute)
			if err := mesh.WaitRedirection(ctx, shared.c, p.ns, "", "enabled", time.Minute); err != nil {
				t.Fatal(err)
			}
			d := driver(t, p.ns, p.client)
			long := driver(t, p.ns, p.client)
			expectReachable(ctx, t, d, p.url("/echo"), true, 30*time.Second)
			longDone := make(chan error, 1)
			go func() {
				r, err := long.Run(ctx, url.Values{"url": {p.url("/echo")}, "n": {"1"}, "timeout": {"30s"}, "h": {"x-amesh-delay: 8s"}})
				if err == nil && r.OK != 1 {
					err = fmt.Errorf("the long request failed: codes %v, errors %v", r.Codes, r.Errors)
				}
				longDone <- err
			}()
			time.Sleep(time.Second)
			lctx, stopLoop := context.WithCancel(ctx)
			results := probeLoop(lctx, d, p.url("/echo"), 100*time.Millisecond)
			time.Sleep(time.Second)
			restarted := time.Now()
			tc.restart(ctx, t, pod(t, p.ns, p.client).Spec.NodeName)
			t.Logf("restart done in %.1fs", time.Since(restarted).Seconds())
			time.Sleep(3 * time.Second)
			stopLoop()
			probes := results()
			if err := <-longDone; err != nil {
				t.Errorf("in-flight request during the restart: %v", err)
			}
			var firstFail, lastFail time.Time
			fails := 0
			for _, pr := range probes {
				if !pr.ok {
					fails++
					if firstFail.IsZero() {
						firstFail = pr.at
					}
					lastFail = pr.at
				}
			}
			t.Logf("%d new connections, %d failed", len(probes), fails)
			if len(probes) < 20 || !probes[len(probes)-1].ok {
				t.Fatalf("traffic did not come back: %d probes, last ok=%t", len(probes), len(probes) > 0 && probes[len(probes)-1].ok)
			}
			if fails == 0 {
				return
			}
			t.Logf("new connections failed from %.1fs to %.1fs after the restart began", firstFail.Sub(restarted).Seconds(), lastFail.Sub(restarted).Seconds())
			if gap := lastFail.Sub(firstFail); gap > 2*time.Second {
				t.Errorf("new connections failed for %.1fs while ztunnel restarted, want ≤ 2s", gap.Seconds())
			}
			if tc.maxFails >= 0 && fails > tc.maxFails {
				t.Errorf("%d new connections failed, want at most %d", fails, tc.maxFails)
			}
		})
	}
}

// TestControllerRestart: a steady 100 requests per second (each on a new
// connection) see no failure while the controller restarts: the data
// plane serves on its last configuration and reconnects.
func TestControllerRestart(t *testing.T) {
	p := newPair(t, "ctrlrestart", true)
	ctx := ctxFor(t, 4*time.Minute)
	if err := mesh.WaitRedirection(ctx, shared.c, p.ns, "", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	d := driver(t, p.ns, p.client)
	expectReachable(ctx, t, d, p.url("/echo"), true, 30*time.Second)
	res := make(chan sample.LoadResult, 1)
	errc := make(chan error, 1)
	go func() {
		r, err := d.Run(ctx, url.Values{"url": {p.url("/echo")}, "qps": {"100"}, "duration": {"25s"}, "c": {"8"}, "newconn": {"true"}, "timeout": {"2s"}})
		res <- r
		errc <- err
	}()
	time.Sleep(3 * time.Second)
	restartPod(ctx, t, "app=amesh-controller", "")
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	r := <-res
	t.Logf("%d requests, %d OK, codes %v, errors %v, p99 %.1fms", r.Requests, r.OK, r.Codes, r.Errors, r.LatencyMs.P99)
	if r.Requests < 2000 {
		t.Errorf("%d requests in 25s, want ≈ 2500 (100/s)", r.Requests)
	}
	if r.OK != r.Requests {
		t.Errorf("%d of %d requests failed while the controller restarted: codes %v, errors %v", r.Requests-r.OK, r.Requests, r.Codes, r.Errors)
	}
}

// TestCNIAgentRestart: restarting the node agents on both nodes does not
// touch running pods: every request during the restarts succeeds, the
// pods stay annotated, and afterwards their traffic is still mTLS.
func TestCNIAgentRestart(t *testing.T) {
	p := newPair(t, "cnirestart", true)
	ctx := ctxFor(t, 4*time.Minute)
	c := shared.c
	if err := mesh.WaitRedirection(ctx, c, p.ns, "", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	d := driver(t, p.ns, p.client)
	expectReachable(ctx, t, d, p.url("/echo"), true, 30*time.Second)
	res := make(chan sample.LoadResult, 1)
	errc := make(chan error, 1)
	go func() {
		r, err := d.Run(ctx, url.Values{"url": {p.url("/echo")}, "qps": {"50"}, "duration": {"20s"}, "c": {"4"}, "newconn": {"true"}, "timeout": {"2s"}})
		res <- r
		errc <- err
	}()
	time.Sleep(2 * time.Second)
	for _, n := range shared.nodes[:2] {
		restartPod(ctx, t, "app=amesh-cni-agent", n)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	r := <-res
	t.Logf("during the restarts: %d requests, %d OK, codes %v, errors %v", r.Requests, r.OK, r.Codes, r.Errors)
	if r.OK != r.Requests || r.Requests < 500 {
		t.Errorf("%d of %d requests failed while the node agents restarted: codes %v, errors %v", r.Requests-r.OK, r.Requests, r.Codes, r.Errors)
	}
	if err := mesh.WaitRedirection(ctx, c, p.ns, "", "enabled", 10*time.Second); err != nil {
		t.Errorf("after the restarts: %v", err)
	}
	loadWithCapture(t, p, 10).assertMTLS(t)
}
