//go:build e2e

package suite

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/url"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/amesh-dev/amesh/e2e/internal/kube"
	"github.com/amesh-dev/amesh/e2e/internal/mesh"
	"github.com/amesh-dev/amesh/e2e/sample"
)

// waypointSetup is an enrolled namespace whose services all go through
// the waypoint "waypoint" (namespace label use-waypoint), with a client.
type waypointSetup struct {
	ns       string
	waypoint *corev1.Pod
	d        *mesh.Driver
}

func newWaypointSetup(t *testing.T, prefix string, ws ...mesh.Workload) waypointSetup {
	t.Helper()
	ns := namespace(t, prefix, true)
	ctx := ctxFor(t, 4*time.Minute)
	c := shared.c
	if err := c.Label(ctx, "namespaces", "", ns, mesh.LabelUseWaypoint, "waypoint"); err != nil {
		t.Fatal(err)
	}
	client := mesh.Workload{Name: "client", Role: "client", Node: shared.nodes[0]}
	deploy(t, ns, append(ws, client)...)
	wp, err := mesh.Waypoint(ctx, c, ns, "waypoint", nil, nil, 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := mesh.WaitRedirection(ctx, c, ns, "app", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	return waypointSetup{ns: ns, waypoint: wp, d: driver(t, ns, client)}
}

func (s waypointSetup) url(svc, path string) string {
	return fmt.Sprintf("http://%s.%s:%d%s", svc, s.ns, mesh.PortApp, path)
}

// eventually runs a load until check accepts its result (configuration
// reaches the waypoint asynchronously), and fails the test otherwise.
func eventually(t *testing.T, d *mesh.Driver, q url.Values, within time.Duration, check func(sample.LoadResult) error) sample.LoadResult {
	t.Helper()
	var last sample.LoadResult
	err := kube.Poll(ctxFor(t, within+time.Minute), time.Second, within, func(ctx context.Context) (bool, error) {
		r, err := d.Run(ctx, q)
		if err != nil {
			return false, err
		}
		last = r
		if err := check(r); err != nil {
			return false, err
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("%s: %v (last: codes %v, versions %v, errors %v)", q.Get("url"), err, last.Codes, last.Versions, last.Errors)
	}
	return last
}

func load(target string, n int, headers ...string) url.Values {
	q := url.Values{"url": {target}, "n": {fmt.Sprint(n)}, "c": {"4"}, "timeout": {"5s"}}
	for _, h := range headers {
		q.Add("h", h)
	}
	return q
}

func codes(want string, n int) func(sample.LoadResult) error {
	return func(r sample.LoadResult) error {
		if r.Codes[want] != int64(n) {
			return fmt.Errorf("want %d × %s, got codes %v", n, want, r.Codes)
		}
		return nil
	}
}

// peerHosts are the client addresses servers saw (field peer.remoteAddr).
func peerHosts(r sample.LoadResult) map[string]int64 {
	out := map[string]int64{}
	for addr, n := range r.Fields["peer.remoteAddr"] {
		h, _, _ := net.SplitHostPort(addr)
		out[h] += n
	}
	return out
}

// viaPeer checks that every answer came from a server that saw the
// connection from ip (the waypoint's, or the client's own address).
func viaPeer(ip string, n int) func(sample.LoadResult) error {
	return func(r sample.LoadResult) error {
		if r.OK != int64(n) {
			return fmt.Errorf("%d of %d OK: %v", r.OK, n, r.Codes)
		}
		if hs := peerHosts(r); hs[ip] != int64(n) {
			return fmt.Errorf("servers saw clients %v, want all from %s", hs, ip)
		}
		return nil
	}
}

// TestWaypointBinding: a per-service-account waypoint takes the traffic
// of its service account's workloads without any label, other services
// stay direct, and use-waypoint on a Service binds it to another waypoint.
// The server sees the waypoint's address, and the waypoint reports the
// requests with the client's identity.
func TestWaypointBinding(t *testing.T) {
	ns := namespace(t, "wpbind", true)
	ctx := ctxFor(t, 5*time.Minute)
	c := shared.c
	special := mesh.Workload{Name: "special", Service: true, Node: shared.nodes[1]}
	plain := mesh.Workload{Name: "plain", Service: true, Node: shared.nodes[1]}
	client := mesh.Workload{Name: "client", Role: "client", Node: shared.nodes[0]}
	deploy(t, ns, special, plain, client)
	saWP, err := mesh.Waypoint(ctx, c, ns, "sa-waypoint", map[string]string{"amesh.dev/waypoint-for": "workload"},
		map[string]string{"amesh.dev/for-service-account": "special"}, 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	svcWP, err := mesh.Waypoint(ctx, c, ns, "svc-waypoint", nil, nil, 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := mesh.WaitRedirection(ctx, c, ns, "app", "enabled", time.Minute); err != nil {
		t.Fatal(err)
	}
	d := driver(t, ns, client)
	clientIP := pod(t, ns, client).Status.PodIP
	target := func(svc string) url.Values {
		q := load(fmt.Sprintf("http://%s.%s:%d/echo", svc, ns, mesh.PortApp), 10)
		q.Set("field", "peer.remoteAddr")
		return q
	}
	eventually(t, d, target("special"), 30*time.Second, viaPeer(saWP.Status.PodIP, 10))
	eventually(t, d, target("plain"), 30*time.Second, viaPeer(clientIP, 10))

	if err := c.Label(ctx, "services", ns, "plain", mesh.LabelUseWaypoint, "svc-waypoint"); err != nil {
		t.Fatal(err)
	}
	eventually(t, d, target("plain"), 30*time.Second, viaPeer(svcWP.Status.PodIP, 10))

	// Each waypoint counted the requests it carried, with the client's
	// verified identity.
	for _, w := range []struct {
		pod *corev1.Pod
		svc string
	}{{saWP, "special"}, {svcWP, "plain"}} {
		m, err := mesh.ScrapeMetrics(ctx, c, ns, w.pod.Name, mesh.PortMetrics)
		if err != nil {
			t.Fatal(err)
		}
		n := m.Sum("istio_requests_total", map[string]string{
			"reporter": "waypoint", "source_principal": mesh.Identity(ns, "client"),
			"destination_service_name": w.svc, "response_code": "200",
		})
		if n < 10 {
			t.Errorf("waypoint %s: %v requests to %s from the client's identity, want ≥ 10", w.pod.Name, n, w.svc)
		}
	}
}

// routeYAML is an HTTPRoute on Service server (GAMMA) with the given rules.
const routeYAML = `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: server
  namespace: %s
spec:
  parentRefs:
  - {group: "", kind: Service, name: server, port: 9080}
  rules:
%s`

func applyRoute(t *testing.T, ns, rules string) {
	t.Helper()
	ctx := ctxFor(t, time.Minute)
	if err := shared.c.ApplyYAML(ctx, routeYAML, ns, rules); err != nil {
		t.Fatal(err)
	}
	if err := mesh.WaitRouteAccepted(ctx, shared.c, ns, "server", 30*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestWaypointRouting: a header match sends marked requests to v2 and the
// rest to v1; a 90/10 split measured over 1000 requests lies within 3σ
// of 10%.
func TestWaypointRouting(t *testing.T) {
	v1 := mesh.Workload{Name: "server-v1", App: "server", Version: "v1", Service: true, VersionService: true, Node: shared.nodes[1]}
	v2 := mesh.Workload{Name: "server-v2", App: "server", Version: "v2", VersionService: true, Node: shared.nodes[1]}
	s := newWaypointSetup(t, "wproute", v1, v2)
	applyRoute(t, s.ns, `  - matches:
    - headers: [{name: x-canary, value: "yes"}]
    backendRefs: [{name: server-v2, port: 9080}]
  - backendRefs: [{name: server-v1, port: 9080}]
`)
	only := func(version string, n int) func(sample.LoadResult) error {
		return func(r sample.LoadResult) error {
			if got := r.Versions["server/"+version]; got != int64(n) || r.OK != int64(n) {
				return fmt.Errorf("want all %d from %s, got versions %v codes %v", n, version, r.Versions, r.Codes)
			}
			return nil
		}
	}
	eventually(t, s.d, load(s.url("server", "/echo"), 20, "x-canary: yes"), 30*time.Second, only("v2", 20))
	eventually(t, s.d, load(s.url("server", "/echo"), 20), 30*time.Second, only("v1", 20))

	applyRoute(t, s.ns, `  - backendRefs:
    - {name: server-v1, port: 9080, weight: 90}
    - {name: server-v2, port: 9080, weight: 10}
`)
	// Wait for the split to be in effect (the previous route sent every
	// unmarked request to v1; under the split, 100 requests all reach v1
	// with probability 0.9^100 < 3e-5), then judge one sample, once:
	// retrying the judgement would widen its 3σ bound.
	eventually(t, s.d, load(s.url("server", "/echo"), 100), 30*time.Second, func(r sample.LoadResult) error {
		if r.Versions["server/v2"] == 0 {
			return fmt.Errorf("no request reached v2 yet: %v", r.Versions)
		}
		return nil
	})
	const n = 1000
	r, err := s.d.Run(ctxFor(t, time.Minute), load(s.url("server", "/echo"), n))
	if err != nil {
		t.Fatal(err)
	}
	if r.OK != n {
		t.Fatalf("%d of %d OK: %v", r.OK, n, r.Codes)
	}
	share := float64(r.Versions["server/v2"]) / n
	bound := 3 * math.Sqrt(0.1*0.9/n)
	if math.Abs(share-0.1) > bound {
		t.Fatalf("v2 got %.1f%% of %d requests, want 10%% ± %.1f%% (%v)", 100*share, n, 100*bound, r.Versions)
	}
	t.Logf("90/10 split: v2 got %.1f%% (bound ± %.1f%%)", 100*share, 100*bound)
}

// TestWaypointResilience: retries hide a backend that fails every other
// request (and are what hides it: without them half fail), a request
// timeout answers 504 for a slow backend, fault injection aborts at the
// waypoint before the backend, mirroring copies requests to another
// service, and a local rate limit answers 429 beyond its bucket.
func TestWaypointResilience(t *testing.T) {
	server := mesh.Workload{Name: "server", Service: true, Node: shared.nodes[1]}
	mirror := mesh.Workload{Name: "mirror", Service: true, Node: shared.nodes[1]}
	s := newWaypointSetup(t, "wpresil", server, mirror)
	target := s.url("server", "/echo")
	flaky := "x-amesh-fail: 1/2"

	t.Run("Retries", func(t *testing.T) {
		// One request at a time, so that the backend's "fail the first
		// of every 2" lines up: without retries exactly half fail, with
		// one retry none does.
		seq := func(n int) url.Values {
			q := load(target, n, flaky)
			q.Set("c", "1")
			return q
		}
		applyRoute(t, s.ns, `  - backendRefs: [{name: server, port: 9080}]
`)
		eventually(t, s.d, seq(20), 30*time.Second, codes("503", 10))
		applyRoute(t, s.ns, `  - backendRefs: [{name: server, port: 9080}]
    retry: {codes: [503], attempts: 2, backoff: 10ms}
`)
		eventually(t, s.d, seq(20), 30*time.Second, codes("200", 20))
	})

	t.Run("Timeout", func(t *testing.T) {
		applyRoute(t, s.ns, `  - backendRefs: [{name: server, port: 9080}]
    timeouts: {request: 300ms}
`)
		r := eventually(t, s.d, load(target, 4, "x-amesh-delay: 2s"), 30*time.Second, codes("504", 4))
		if r.LatencyMs.Max > 1500 {
			t.Errorf("504s took up to %.0fms, want about the 300ms timeout", r.LatencyMs.Max)
		}
		eventually(t, s.d, load(target, 4, "x-amesh-delay: 50ms"), 10*time.Second, codes("200", 4))
	})

	t.Run("Mirror", func(t *testing.T) {
		applyRoute(t, s.ns, `  - backendRefs: [{name: server, port: 9080}]
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: mirror, port: 9080}
`)
		// Wait until mirroring is on, then count exactly.
		eventually(t, s.d, load(target, 5), 30*time.Second, codes("200", 5))
		stats := func() int64 {
			q := load(s.url("mirror", "/stats"), 1)
			q.Set("field", "total")
			r, err := s.d.Run(ctxFor(t, 30*time.Second), q)
			if err != nil {
				t.Fatal(err)
			}
			for v := range r.Fields["total"] {
				var n int64
				fmt.Sscan(v, &n)
				return n
			}
			t.Fatalf("no total in the mirror's /stats: %+v", r)
			return 0
		}
		before := stats()
		eventually(t, s.d, load(target, 30), 10*time.Second, codes("200", 30))
		var after int64
		_ = kube.Poll(ctxFor(t, 30*time.Second), 500*time.Millisecond, 10*time.Second, func(context.Context) (bool, error) {
			after = stats()
			return after-before >= 30, nil
		})
		if after-before != 30 {
			t.Errorf("the mirror received %d of 30 requests", after-before)
		}
	})

	policy := `apiVersion: traffic.amesh.dev/v1alpha1
kind: BackendTrafficPolicy
metadata:
  name: server
  namespace: %s
spec:
  targetRefs: [{group: "", kind: Service, name: server}]
%s`
	t.Run("FaultInjection", func(t *testing.T) {
		applyRoute(t, s.ns, `  - backendRefs: [{name: server, port: 9080}]
`)
		ctx := ctxFor(t, time.Minute)
		if err := shared.c.ApplyYAML(ctx, policy, s.ns, "  faultInjection:\n    abort: {percent: 100, httpStatus: 418}\n"); err != nil {
			t.Fatal(err)
		}
		r := eventually(t, s.d, load(target, 10), 30*time.Second, codes("418", 10))
		if r.Faults != 0 {
			t.Errorf("%d answers were the sample's own injected faults; the waypoint should abort before the backend", r.Faults)
		}
		if err := shared.c.DeleteYAML(ctx, policy, s.ns, ""); err != nil {
			t.Fatal(err)
		}
		eventually(t, s.d, load(target, 10), 30*time.Second, codes("200", 10))
	})

	t.Run("RateLimit", func(t *testing.T) {
		ctx := ctxFor(t, time.Minute)
		if err := shared.c.ApplyYAML(ctx, policy, s.ns, "  localRateLimit: {maxTokens: 5, fillInterval: 1h}\n"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = shared.c.DeleteYAML(context.Background(), policy, s.ns, "") })
		// The bucket may be partly spent while the policy arrives: wait
		// for the first 429, then the bucket stays empty for an hour.
		eventually(t, s.d, load(target, 20), 30*time.Second, func(r sample.LoadResult) error {
			if r.Codes["429"] == 0 || r.OK > 5 {
				return fmt.Errorf("want at most 5 OK and the rest 429, got %v", r.Codes)
			}
			return nil
		})
		eventually(t, s.d, load(target, 10), 5*time.Second, codes("429", 10))
	})
}

// TestWaypointAuthorization: an L7 DENY by path refuses only that path
// (403 from the waypoint); with a RequestAuthentication and an ALLOW
// policy requiring a request principal, requests without a token are
// refused (403), a token signed by another key is rejected (401), and a
// valid one is let through.
func TestWaypointAuthorization(t *testing.T) {
	server := mesh.Workload{Name: "server", Service: true, Node: shared.nodes[1]}
	s := newWaypointSetup(t, "wpauthz", server)
	ctx := ctxFor(t, 3*time.Minute)

	deny := `apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: %s
spec:
  targetRefs: [{group: "", kind: Service, name: server}]
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin/*"]
`
	if err := shared.c.ApplyYAML(ctx, deny, s.ns); err != nil {
		t.Fatal(err)
	}
	eventually(t, s.d, load(s.url("server", "/admin/users"), 5), 30*time.Second, codes("403", 5))
	eventually(t, s.d, load(s.url("server", "/echo"), 5), 10*time.Second, codes("200", 5))
	if err := shared.c.DeleteYAML(ctx, deny, s.ns); err != nil {
		t.Fatal(err)
	}

	issuer := "https://issuer.e2e.amesh.dev"
	key, jwks := newJWKS(t)
	other, _ := newJWKS(t)
	other.kid = key.kid // a forgery: the right key ID, another key
	authn := `apiVersion: security.amesh.dev/v1alpha1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: %s
spec:
  targetRefs: [{group: "", kind: Service, name: server}]
  jwtRules:
  - issuer: %q
    jwks: %q
---
apiVersion: security.amesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: require-jwt
  namespace: %s
spec:
  targetRefs: [{group: "", kind: Service, name: server}]
  action: ALLOW
  rules:
  - from:
    - source:
        requestPrincipals: ["%s/*"]
`
	if err := shared.c.ApplyYAML(ctx, authn, s.ns, issuer, jwks, s.ns, issuer); err != nil {
		t.Fatal(err)
	}
	target := s.url("server", "/echo")
	good := "Authorization: Bearer " + signJWT(t, key, issuer, "alice")
	forged := "Authorization: Bearer " + signJWT(t, other, issuer, "mallory")
	eventually(t, s.d, load(target, 5), 30*time.Second, codes("403", 5))
	eventually(t, s.d, load(target, 5, forged), 10*time.Second, codes("401", 5))
	eventually(t, s.d, load(target, 5, good), 10*time.Second, codes("200", 5))
}
