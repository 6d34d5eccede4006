package proxy

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

func get(t *testing.T, c *http.Client, url string, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		if strings.EqualFold(hdr[i], "host") {
			req.Host = hdr[i+1]
			continue
		}
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

// noRedirect returns c not following redirects.
func noRedirect(c *http.Client) *http.Client {
	nc := *c
	nc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &nc
}

// eachClient runs f as a subtest with an HTTP/1.1 client and with an h2c
// client, each through a fresh environment when f makes one.
func eachClient(t *testing.T, f func(t *testing.T, c *http.Client)) {
	for _, cl := range clients(t) {
		t.Run(cl.name, func(t *testing.T) { f(t, cl.c) })
	}
}

func TestDefaultRouteAndMetrics(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		e.service("reviews", 9080, "http", named(t, "reviews-a"))
		e.waypoint(&discoveryv1.WaypointService{Service: key("reviews")})
		url := e.front("reviews", 9080, false)
		resp, body := get(t, c, url+"/anything")
		if resp.StatusCode != 200 || body != "reviews-a" {
			t.Fatalf("got %d %q", resp.StatusCode, body)
		}
		n := testutil.ToFloat64(e.proxy.metrics.RequestsCounter().WithLabelValues(
			"waypoint", "unknown", "client", "spiffe://cluster.local/ns/client/sa/curl", "unknown", "unknown", "unknown", "unknown", "unknown",
			"reviews", "default", "spiffe://cluster.local/ns/default/sa/reviews", "reviews", "v1",
			"reviews.default.svc.cluster.local", "reviews", "default", "reviews", "v1", "unknown",
			"http", "200", "", "-", "mutual_tls"))
		if n != 1 {
			t.Fatalf("istio_requests_total = %v, want 1", n)
		}
	})
}

func TestRoutingFiltersAndRedirect(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		var seen atomic.Value
		v2 := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			seen.Store(r.Clone(r.Context()))
			w.Header().Set("X-Remove-Me", "1")
			_, _ = io.WriteString(w, "v2")
		}))
		e.service("reviews", 80, "http", named(t, "v1"))
		e.service("reviews-v2", 80, "http", v2)
		e.waypoint(&discoveryv1.WaypointService{Service: key("reviews"), HttpRoutes: []*discoveryv1.HTTPRoute{{
			Namespace: "default", Name: "reviews", Rules: []*discoveryv1.HTTPRouteRule{
				{
					Matches: []*discoveryv1.HTTPRouteMatch{{Path: &discoveryv1.PathMatch{Value: "/api"}, Headers: []*discoveryv1.HeaderMatch{{Name: "x-version", Value: "2"}}}},
					Filters: []*discoveryv1.HTTPFilter{
						{Kind: &discoveryv1.HTTPFilter_RequestHeaderModifier{RequestHeaderModifier: &discoveryv1.HeaderModifier{
							Set: []*discoveryv1.Header{{Name: "x-set", Value: "yes"}}, Remove: []string{"x-secret"}}}},
						{Kind: &discoveryv1.HTTPFilter_ResponseHeaderModifier{ResponseHeaderModifier: &discoveryv1.HeaderModifier{
							Add: []*discoveryv1.Header{{Name: "x-resp", Value: "added"}}, Remove: []string{"x-remove-me"}}}},
						{Kind: &discoveryv1.HTTPFilter_UrlRewrite{UrlRewrite: &discoveryv1.URLRewrite{Hostname: "rewritten.example",
							Path: &discoveryv1.PathModifier{Kind: &discoveryv1.PathModifier_ReplacePrefixMatch{ReplacePrefixMatch: "/v2"}}}}},
					},
					Backends: []*discoveryv1.BackendRef{{Service: key("reviews-v2"), Port: 80, Weight: 1}},
				},
				{
					Matches: []*discoveryv1.HTTPRouteMatch{{Path: &discoveryv1.PathMatch{Type: discoveryv1.PathMatch_TYPE_EXACT, Value: "/old"}}},
					Filters: []*discoveryv1.HTTPFilter{{Kind: &discoveryv1.HTTPFilter_RequestRedirect{RequestRedirect: &discoveryv1.RequestRedirect{
						Path: &discoveryv1.PathModifier{Kind: &discoveryv1.PathModifier_ReplaceFullPath{ReplaceFullPath: "/new"}}, StatusCode: 301}}}},
				},
				{
					Matches: []*discoveryv1.HTTPRouteMatch{{Path: &discoveryv1.PathMatch{Value: "/moved"}}},
					Filters: []*discoveryv1.HTTPFilter{{Kind: &discoveryv1.HTTPFilter_RequestRedirect{RequestRedirect: &discoveryv1.RequestRedirect{
						Hostname: "elsewhere"}}}},
				},
				{
					Matches:  []*discoveryv1.HTTPRouteMatch{{Path: &discoveryv1.PathMatch{Value: "/"}}},
					Backends: []*discoveryv1.BackendRef{{Service: key("reviews"), Port: 80, Weight: 1}},
				},
			}}}})
		url := e.front("reviews", 80, false)

		resp, body := get(t, c, url+"/api/items?q=1", "x-version", "2", "x-secret", "s")
		if resp.StatusCode != 200 || body != "v2" {
			t.Fatalf("got %d %q", resp.StatusCode, body)
		}
		if resp.Header.Get("X-Resp") != "added" || resp.Header.Get("X-Remove-Me") != "" {
			t.Errorf("response headers %v", resp.Header)
		}
		r := seen.Load().(*http.Request)
		if r.URL.Path != "/v2/items" || r.URL.RawQuery != "q=1" || r.Host != "rewritten.example" || r.Header.Get("X-Set") != "yes" || r.Header.Get("X-Secret") != "" {
			t.Errorf("backend saw %s %s host=%s headers=%v", r.URL.Path, r.URL.RawQuery, r.Host, r.Header)
		}
		if r.Header.Get("Traceparent") == "" || r.Header.Get("X-B3-Traceid") == "" || r.Header.Get("X-Request-Id") == "" {
			t.Errorf("trace headers not propagated: %v", r.Header)
		}
		if _, body := get(t, c, url+"/api/items", "x-version", "1"); body != "v1" {
			t.Errorf("header mismatch routed to %q", body)
		}
		resp, _ = get(t, noRedirect(c), url+"/old?x=y", "host", "reviews:80")
		if resp.StatusCode != 301 || resp.Header.Get("Location") != "http://reviews/new?x=y" {
			t.Errorf("redirect %d %q", resp.StatusCode, resp.Header.Get("Location"))
		}
		// The Location keeps the path escaped: %3F is not a query.
		resp, _ = get(t, noRedirect(c), url+"/moved/a%3Fb?c=d", "host", "reviews:80")
		if resp.StatusCode != 302 || resp.Header.Get("Location") != "http://elsewhere/moved/a%3Fb?c=d" {
			t.Errorf("redirect of an escaped path: %d %q", resp.StatusCode, resp.Header.Get("Location"))
		}
		// Path normalisation: /api/../old is /old.
		resp, _ = get(t, noRedirect(c), url+"/x/../old")
		if resp.StatusCode != 301 {
			t.Errorf("normalised path got %d", resp.StatusCode)
		}
	})
}

func TestTraceContextContinued(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		var seen atomic.Value
		e.service("svc", 80, "http", backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			seen.Store(r.Header.Clone())
		})))
		e.waypoint(&discoveryv1.WaypointService{Service: key("svc")})
		url := e.front("svc", 80, false)
		const tid = "4bf92f3577b34da6a3ce929d0e0e4736"
		get(t, c, url+"/", "traceparent", "00-"+tid+"-00f067aa0ba902b7-01", "tracestate", "vendor=x")
		h := seen.Load().(http.Header)
		tp := h.Get("Traceparent")
		if !strings.HasPrefix(tp, "00-"+tid+"-") || strings.Contains(tp, "00f067aa0ba902b7") || h.Get("Tracestate") != "vendor=x" {
			t.Fatalf("traceparent %q tracestate %q", tp, h.Get("Tracestate"))
		}
		if h.Get("X-B3-Traceid") != tid {
			t.Fatalf("b3 trace id %q", h.Get("X-B3-Traceid"))
		}
		// B3 only in, both out.
		get(t, c, url+"/", "x-b3-traceid", tid, "x-b3-spanid", "00f067aa0ba902b7", "x-b3-sampled", "1")
		h = seen.Load().(http.Header)
		if !strings.HasPrefix(h.Get("Traceparent"), "00-"+tid+"-") {
			t.Fatalf("b3 not continued into traceparent: %v", h)
		}
	})
}

func TestWeightedSplit(t *testing.T) {
	e := newEnv(t)
	e.service("a", 80, "http", named(t, "a"))
	e.service("b", 80, "http", named(t, "b"))
	e.service("front", 80, "http", named(t, "front"))
	e.waypoint(&discoveryv1.WaypointService{Service: key("front"), HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "split",
		Rules: []*discoveryv1.HTTPRouteRule{{Backends: []*discoveryv1.BackendRef{
			{Service: key("a"), Port: 80, Weight: 80}, {Service: key("b"), Port: 80, Weight: 20}, {Service: key("front"), Port: 80, Weight: 0}}}}}}})
	url := e.front("front", 80, false)
	const n = 2000
	counts := map[string]int{}
	for range n {
		_, body := get(t, http.DefaultClient, url+"/")
		counts[body]++
	}
	// Binomial(2000, 0.2): sd ≈ 17.9; 5 sd bounds.
	if counts["b"] < 400-90 || counts["b"] > 400+90 || counts["front"] != 0 || counts["a"]+counts["b"] != n {
		t.Fatalf("split %v, want ~80/20 and nothing to the zero-weight backend", counts)
	}
}

func TestRetriesAndBodies(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		var calls atomic.Int32
		var bodies sync.Map
		flaky := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			n := calls.Add(1)
			bodies.Store(n, string(b))
			if n%3 != 0 { // two failures, then success
				w.WriteHeader(503)
				return
			}
			_, _ = io.WriteString(w, "ok:"+string(b))
		}))
		e.service("flaky", 80, "http", flaky)
		e.waypoint(&discoveryv1.WaypointService{Service: key("flaky"), HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r",
			Rules: []*discoveryv1.HTTPRouteRule{{
				Backends: []*discoveryv1.BackendRef{{Service: key("flaky"), Port: 80, Weight: 1}},
				Retry:    &discoveryv1.RetryPolicy{Attempts: 2, Codes: []uint32{503}, Backoff: durationpb.New(time.Millisecond)},
			}}}}})
		url := e.front("flaky", 80, false)
		resp, err := c.Post(url+"/", "text/plain", strings.NewReader("payload"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "ok:payload" || calls.Load() != 3 {
			t.Fatalf("got %d %q after %d calls", resp.StatusCode, b, calls.Load())
		}
		for i := int32(1); i <= 3; i++ {
			if v, _ := bodies.Load(i); v != "payload" {
				t.Fatalf("attempt %d saw body %q", i, v)
			}
		}
		// A body larger than the replay buffer is not retried: one call, 503.
		calls.Store(0)
		big := bytes.Repeat([]byte("x"), 200<<10)
		resp, err = c.Post(url+"/", "text/plain", io.MultiReader(bytes.NewReader(big))) // unknown length
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 503 || calls.Load() != 1 {
			t.Fatalf("non-replayable body: status %d after %d calls", resp.StatusCode, calls.Load())
		}
	})
}

func TestConnectErrorRetriedElsewhere(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		dead := named(t, "dead")
		dead.Close()
		e.service("svc", 80, "http", dead, named(t, "alive"))
		e.waypoint(&discoveryv1.WaypointService{Service: key("svc"), HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r",
			Rules: []*discoveryv1.HTTPRouteRule{{
				Backends: []*discoveryv1.BackendRef{{Service: key("svc"), Port: 80, Weight: 1}},
				Retry:    &discoveryv1.RetryPolicy{Attempts: 1},
			}}}}})
		url := e.front("svc", 80, false)
		for range 10 {
			if resp, body := get(t, c, url+"/"); resp.StatusCode != 200 || body != "alive" {
				t.Fatalf("got %d %q", resp.StatusCode, body)
			}
		}
	})
}

func TestTimeouts(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		var calls atomic.Int32
		slow := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/retry/warm" {
				return // opens the upstream connection (so that the first attempt below is not cut short by a dial)
			}
			if calls.Add(1) == 1 || r.URL.Path == "/always-slow" {
				select {
				case <-time.After(2 * time.Second):
				case <-r.Context().Done():
					return
				}
			}
			_, _ = io.WriteString(w, "fast")
		}))
		e.service("slow", 80, "http", slow)
		e.waypoint(&discoveryv1.WaypointService{Service: key("slow"), HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r",
			Rules: []*discoveryv1.HTTPRouteRule{
				{
					Matches:               []*discoveryv1.HTTPRouteMatch{{Path: &discoveryv1.PathMatch{Value: "/retry"}}},
					Backends:              []*discoveryv1.BackendRef{{Service: key("slow"), Port: 80, Weight: 1}},
					BackendRequestTimeout: durationpb.New(250 * time.Millisecond),
					RequestTimeout:        durationpb.New(1500 * time.Millisecond),
					Retry:                 &discoveryv1.RetryPolicy{Attempts: 1},
				},
				{
					Matches:        []*discoveryv1.HTTPRouteMatch{{Path: &discoveryv1.PathMatch{Value: "/always-slow"}}},
					Backends:       []*discoveryv1.BackendRef{{Service: key("slow"), Port: 80, Weight: 1}},
					RequestTimeout: durationpb.New(150 * time.Millisecond),
				},
			}}}})
		url := e.front("slow", 80, false)
		get(t, c, url+"/retry/warm")
		start := time.Now()
		resp, body := get(t, c, url+"/retry")
		if resp.StatusCode != 200 || body != "fast" || time.Since(start) > 1500*time.Millisecond {
			t.Fatalf("per-try timeout + retry: %d %q in %v", resp.StatusCode, body, time.Since(start))
		}
		start = time.Now()
		resp, body = get(t, c, url+"/always-slow")
		if resp.StatusCode != 504 || body != "upstream request timeout" || time.Since(start) > time.Second {
			t.Fatalf("request timeout: %d %q in %v", resp.StatusCode, body, time.Since(start))
		}
	})
}

func TestMirrorNeverChangesResponse(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		mirrored := make(chan string, 10)
		mirror := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			mirrored <- r.Method + " " + r.URL.Path + " " + string(b)
			w.WriteHeader(500) // the mirror's answer must not matter
			time.Sleep(50 * time.Millisecond)
		}))
		e.service("main", 80, "http", named(t, "main"))
		e.service("shadow", 80, "http", mirror)
		e.waypoint(&discoveryv1.WaypointService{Service: key("main"), HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r",
			Rules: []*discoveryv1.HTTPRouteRule{{
				Filters: []*discoveryv1.HTTPFilter{{Kind: &discoveryv1.HTTPFilter_RequestMirror{RequestMirror: &discoveryv1.RequestMirror{
					Backend: &discoveryv1.BackendRef{Service: key("shadow"), Port: 80}, Percent: 100}}}},
				Backends: []*discoveryv1.BackendRef{{Service: key("main"), Port: 80, Weight: 1}},
			}}}}})
		url := e.front("main", 80, false)
		resp, err := c.Post(url+"/m", "text/plain", strings.NewReader("hello"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "main" {
			t.Fatalf("mirror changed the response: %d %q", resp.StatusCode, b)
		}
		select {
		case got := <-mirrored:
			if got != "POST /m hello" {
				t.Fatalf("mirror saw %q", got)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("mirror never received the request")
		}
		// A dead mirror does not change anything either.
		e.service("shadow", 80, "http")
		if resp, body := get(t, c, url+"/m"); resp.StatusCode != 200 || body != "main" {
			t.Fatalf("dead mirror: %d %q", resp.StatusCode, body)
		}
		e.proxy.WaitMirrors()
	})
}

func TestRateLimitFaultAndAuthz(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		e.service("rl", 80, "http", named(t, "rl"))
		e.waypoint(&discoveryv1.WaypointService{Service: key("rl"), TrafficPolicy: &discoveryv1.TrafficPolicy{
			LocalRateLimit: &discoveryv1.LocalRateLimit{MaxTokens: 7, TokensPerFill: 1, FillInterval: durationpb.New(time.Hour)}}})
		url := e.front("rl", 80, false)
		codes := map[int]int{}
		for range 20 {
			resp, _ := get(t, c, url+"/")
			codes[resp.StatusCode]++
			if ra := resp.Header.Get("Retry-After"); resp.StatusCode == 429 && ra != "3600" && ra != "3599" {
				t.Fatalf("429 with Retry-After %q, want the ~3600 s to the next fill", ra)
			}
		}
		if codes[200] != 7 || codes[429] != 13 {
			t.Fatalf("rate limit: %v, want exactly 7×200 and 13×429", codes)
		}

		e.service("faulty", 80, "http", named(t, "faulty"))
		e.waypoint(&discoveryv1.WaypointService{Service: key("faulty"), TrafficPolicy: &discoveryv1.TrafficPolicy{Fault: &discoveryv1.FaultInjection{
			Delay: &discoveryv1.FaultDelay{Percent: 100, Duration: durationpb.New(100 * time.Millisecond)},
			Abort: &discoveryv1.FaultAbort{Percent: 100, HttpStatus: 418}}}})
		url = e.front("faulty", 80, false)
		start := time.Now()
		if resp, _ := get(t, c, url+"/"); resp.StatusCode != 418 || time.Since(start) < 100*time.Millisecond {
			t.Fatalf("fault: %d after %v", resp.StatusCode, time.Since(start))
		}

		e.service("secure", 80, "http", named(t, "secure"))
		e.waypoint(&discoveryv1.WaypointService{Service: key("secure"), Authorizations: []*discoveryv1.Authorization{
			{Namespace: "default", Name: "deny-admin", Action: discoveryv1.Authorization_ACTION_DENY,
				Rules: []*discoveryv1.Rule{{To: []*discoveryv1.Operation{{Paths: []string{"/admin*"}}}}}},
			{Namespace: "default", Name: "allow-client", Action: discoveryv1.Authorization_ACTION_ALLOW,
				Rules: []*discoveryv1.Rule{{From: []*discoveryv1.Source{{Principals: []string{"cluster.local/ns/client/sa/curl"}}},
					To: []*discoveryv1.Operation{{Methods: []string{"GET"}}}}}},
		}})
		url = e.front("secure", 80, false)
		if resp, body := get(t, c, url+"/ok"); resp.StatusCode != 200 || body != "secure" {
			t.Fatalf("allowed request: %d %q", resp.StatusCode, body)
		}
		if resp, body := get(t, c, url+"/admin/x"); resp.StatusCode != 403 || body != "RBAC: access denied" {
			t.Fatalf("denied path: %d %q", resp.StatusCode, body)
		}
		// Normalisation closes the /ok/../admin bypass.
		if resp, _ := get(t, c, url+"/ok/../admin"); resp.StatusCode != 403 {
			t.Fatalf("dot-segment bypass: %d", resp.StatusCode)
		}
		resp, err := c.Post(url+"/ok", "text/plain", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 403 {
			t.Fatalf("POST not allowed by the ALLOW policy got %d", resp.StatusCode)
		}
	})
}

func TestCircuitBreakerOverflow(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		release := make(chan struct{})
		entered := make(chan struct{}, 1)
		e.service("cb", 80, "http", backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			entered <- struct{}{}
			<-release
		})))
		e.waypoint(&discoveryv1.WaypointService{Service: key("cb"), TrafficPolicy: &discoveryv1.TrafficPolicy{
			CircuitBreaker: &discoveryv1.CircuitBreaker{MaxRequests: 1}}})
		url := e.front("cb", 80, false)
		done := make(chan int)
		go func() {
			resp, err := c.Get(url + "/")
			if err != nil {
				done <- 0
				return
			}
			resp.Body.Close()
			done <- resp.StatusCode
		}()
		<-entered
		resp, body := get(t, c, url+"/")
		if resp.StatusCode != 503 || body != "upstream overflow" {
			t.Fatalf("second request: %d %q", resp.StatusCode, body)
		}
		close(release)
		if c := <-done; c != 200 {
			t.Fatalf("first request: %d", c)
		}
		got := testutil.CollectAndCount(e.proxy.metrics.RequestsCounter())
		if got == 0 {
			t.Fatal("no metrics")
		}
		if !hasFlag(t, e, "UO") {
			t.Fatal("no istio_requests_total with response_flags=UO")
		}
	})
}

func hasFlag(t *testing.T, e *env, flag string) bool {
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "istio_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "response_flags" && l.GetValue() == flag {
					return true
				}
			}
		}
	}
	return false
}

func TestOutlierEjectsFailingEndpoint(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		var badCalls atomic.Int32
		bad := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			badCalls.Add(1)
			w.WriteHeader(500)
		}))
		e.service("od", 80, "http", bad, named(t, "good"))
		e.waypoint(&discoveryv1.WaypointService{Service: key("od"), TrafficPolicy: &discoveryv1.TrafficPolicy{
			OutlierDetection: &discoveryv1.OutlierDetection{Consecutive_5Xx: 3, BaseEjectionTime: durationpb.New(time.Minute), MaxEjectionPercent: 50}}})
		url := e.front("od", 80, false)
		for range 40 {
			get(t, c, url+"/")
		}
		if badCalls.Load() != 3 {
			t.Fatalf("failing endpoint got %d requests, want exactly 3 before ejection", badCalls.Load())
		}
		if !hasFlag(t, e, "-") {
			t.Fatal("no successful requests recorded")
		}
	})
}

func TestWebSocketUpgrade(t *testing.T) {
	e := newEnv(t)
	e.service("ws", 80, "http", backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
			http.Error(w, "want upgrade", 400)
			return
		}
		rc := http.NewResponseController(w)
		w.Header().Set("Upgrade", "websocket")
		w.Header().Set("Connection", "Upgrade")
		w.WriteHeader(http.StatusSwitchingProtocols)
		conn, brw, err := rc.Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		line, _ := brw.ReadString('\n')
		_, _ = brw.WriteString("echo:" + line)
		_ = brw.Flush()
	})))
	e.waypoint(&discoveryv1.WaypointService{Service: key("ws")})
	url := e.front("ws", 80, false)
	req, _ := http.NewRequest("GET", url+"/chat", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d", resp.StatusCode)
	}
	rw, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		t.Fatalf("body %T is not a connection", resp.Body)
	}
	defer rw.Close()
	_, _ = io.WriteString(rw, "hi\n")
	b := make([]byte, 8)
	n, _ := io.ReadFull(rw, b)
	if string(b[:n]) != "echo:hi\n" {
		t.Fatalf("got %q", b[:n])
	}
}

func TestConsistentHashCookieSticks(t *testing.T) {
	eachClient(t, func(t *testing.T, c *http.Client) {
		e := newEnv(t)
		e.service("sticky", 80, "http", named(t, "s1"), named(t, "s2"), named(t, "s3"))
		e.waypoint(&discoveryv1.WaypointService{Service: key("sticky"), TrafficPolicy: &discoveryv1.TrafficPolicy{
			LoadBalancer: &discoveryv1.LoadBalancer{Type: discoveryv1.LoadBalancer_TYPE_CONSISTENT_HASH,
				HashCookie: &discoveryv1.HashCookie{Name: "session", Ttl: durationpb.New(time.Hour)}}}})
		url := e.front("sticky", 80, false)
		seen := map[string]bool{}
		for range 12 {
			resp, first := get(t, c, url+"/")
			var cookie *http.Cookie
			for _, c := range resp.Cookies() {
				if c.Name == "session" {
					cookie = c
				}
			}
			if cookie == nil || cookie.MaxAge != 3600 {
				t.Fatalf("no session cookie set: %v", resp.Header)
			}
			seen[first] = true
			for range 5 {
				resp, body := get(t, c, url+"/", "Cookie", "session="+cookie.Value)
				if body != first {
					t.Fatalf("cookie %s went to %q then %q", cookie.Value, first, body)
				}
				if len(resp.Cookies()) != 0 {
					t.Fatal("cookie set again though the request carried it")
				}
			}
		}
		if len(seen) < 2 {
			t.Fatalf("12 new sessions all landed on %v", seen)
		}
	})
}

func TestAccessLog(t *testing.T) {
	e := newEnv(t)
	e.service("logged", 80, "http", named(t, "logged"))
	e.waypoint(&discoveryv1.WaypointService{Service: key("logged"), HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r",
		Rules: []*discoveryv1.HTTPRouteRule{{Name: "rewrite",
			Filters: []*discoveryv1.HTTPFilter{{Kind: &discoveryv1.HTTPFilter_UrlRewrite{UrlRewrite: &discoveryv1.URLRewrite{
				Path: &discoveryv1.PathModifier{Kind: &discoveryv1.PathModifier_ReplaceFullPath{ReplaceFullPath: "/inner"}}}}}},
			Backends: []*discoveryv1.BackendRef{{Service: key("logged"), Port: 80, Weight: 1}}}}}}})
	url := e.front("logged", 80, false)
	get(t, http.DefaultClient, url+"/outer?q=1", "x-request-id", "req-42", "user-agent", "tester")
	entries := e.access.FilterMessage("request").All()
	if len(entries) != 1 {
		t.Fatalf("%d access log entries", len(entries))
	}
	f := entries[0].ContextMap()
	want := map[string]any{
		"method": "GET", "path": "/outer?q=1", "upstream_path": "/inner?q=1", "response_code": int64(200),
		"response_flags": "-", "route_name": "default/r/rewrite", "x_request_id": "req-42", "user_agent": "tester",
		"downstream_peer_principal": "spiffe://cluster.local/ns/client/sa/curl", "attempts": int64(1),
		"upstream_cluster": key("logged") + ":80",
	}
	for k, v := range want {
		if f[k] != v {
			t.Errorf("%s = %v (%T), want %v", k, f[k], f[k], v)
		}
	}
	if h, _ := f["upstream_host"].(string); !strings.HasPrefix(h, "127.") {
		t.Errorf("upstream_host %v", f["upstream_host"])
	}
	if tid, _ := f["trace_id"].(string); len(tid) != 32 {
		t.Errorf("trace_id %v", f["trace_id"])
	}
}

// TestClientGoneIsNotUpstreamFailure: requests that fail because the
// downstream client went away (cancelled while waiting for the response,
// or a broken upload) neither count against the endpoint for outlier
// detection nor are retried.
func TestClientGoneIsNotUpstreamFailure(t *testing.T) {
	for _, cl := range clients(t) {
		for _, how := range []string{"cancelled", "broken upload"} {
			if how == "broken upload" && cl.name != "http1" {
				continue // written by hand below, as HTTP/1.1
			}
			t.Run(cl.name+" "+how, func(t *testing.T) {
				e := newEnv(t)
				var calls atomic.Int32
				entered := make(chan struct{}, 16)
				e.service("od", 80, "http", backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if r.URL.Path == "/ok" {
						_, _ = io.WriteString(w, "ok")
						return
					}
					calls.Add(1)
					entered <- struct{}{}
					if _, err := io.Copy(io.Discard, r.Body); err != nil {
						return
					}
					<-r.Context().Done()
				})))
				e.waypoint(&discoveryv1.WaypointService{Service: key("od"),
					HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*discoveryv1.HTTPRouteRule{{
						Backends: []*discoveryv1.BackendRef{{Service: key("od"), Port: 80, Weight: 1}},
						Retry:    &discoveryv1.RetryPolicy{Attempts: 3, Backoff: durationpb.New(time.Millisecond)},
					}}}},
					TrafficPolicy: &discoveryv1.TrafficPolicy{OutlierDetection: &discoveryv1.OutlierDetection{
						Consecutive_5Xx: 1, ConsecutiveGatewayErrors: 1, BaseEjectionTime: durationpb.New(time.Minute), MaxEjectionPercent: 100}}})
				url := e.front("od", 80, false)
				const n = 5
				for range n {
					switch how {
					case "cancelled":
						ctx, cancel := context.WithCancel(context.Background())
						req, _ := http.NewRequestWithContext(ctx, "GET", url+"/hang", nil)
						errc := make(chan error, 1)
						go func() {
							resp, err := cl.c.Do(req)
							if err == nil {
								resp.Body.Close()
							}
							errc <- err
						}()
						select {
						case <-entered:
							cancel()
							if err := <-errc; err == nil {
								t.Fatal("cancelled request succeeded")
							}
						case err := <-errc:
							cancel()
							t.Errorf("request answered before reaching the backend: %v", err)
						}
					case "broken upload":
						c, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
						if err != nil {
							t.Fatal(err)
						}
						_, _ = io.WriteString(c, "POST /upload HTTP/1.1\r\nHost: od\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n"+strings.Repeat("x", 1024)+"\r\n")
						select {
						case <-entered:
						case <-time.After(5 * time.Second):
							t.Error("upload never reached the backend")
						}
						c.Close() // mid-body
					}
				}
				cluster, err := e.cat.Cluster(key("od"), 80)
				if err != nil {
					t.Fatal(err)
				}
				// The waypoint notices a gone client asynchronously: wait
				// for it to finish with each request.
				for deadline := time.Now().Add(5 * time.Second); cluster.Endpoints()[0].Outstanding() != 0 && time.Now().Before(deadline); {
					time.Sleep(10 * time.Millisecond)
				}
				if got := cluster.Ejections(); got != 0 {
					t.Errorf("%d ejections of a healthy endpoint after %d requests whose client went away", got, n)
				}
				if got := calls.Load(); got != n {
					t.Errorf("backend saw %d attempts for %d requests, want one each (never a retry)", got, n)
				}
				if resp, body := get(t, cl.c, url+"/ok"); resp.StatusCode != 200 || body != "ok" {
					t.Errorf("then: %d %q", resp.StatusCode, body)
				}
			})
		}
	}
}

// TestInvalidRateLimitFailsClosed: a LocalRateLimit that cannot be
// enforced refuses the service's requests (503, flag RLSE) rather than
// letting them through unlimited; a valid one replacing it serves again.
func TestInvalidRateLimitFailsClosed(t *testing.T) {
	e := newEnv(t)
	e.service("rl", 80, "http", named(t, "rl"))
	ws := &discoveryv1.WaypointService{Service: key("rl"), TrafficPolicy: &discoveryv1.TrafficPolicy{
		LocalRateLimit: &discoveryv1.LocalRateLimit{MaxTokens: 10, TokensPerFill: 1}}} // no fill interval
	e.waypoint(ws)
	url := e.front("rl", 80, false)
	for _, cl := range clients(t) {
		resp, body := get(t, cl.c, url+"/")
		if resp.StatusCode != 503 || body != "local_rate_limit_invalid_config" {
			t.Fatalf("%s: invalid rate limit: %d %q", cl.name, resp.StatusCode, body)
		}
	}
	if !hasFlag(t, e, "RLSE") {
		t.Error("no istio_requests_total with response_flags=RLSE")
	}
	if n := e.cat.InvalidRateLimits(); n != 1 {
		t.Errorf("InvalidRateLimits = %d, want 1", n)
	}
	ws = proto.Clone(ws).(*discoveryv1.WaypointService)
	ws.TrafficPolicy.LocalRateLimit.FillInterval = durationpb.New(time.Second)
	e.waypoint(ws)
	if resp, body := get(t, http.DefaultClient, url+"/"); resp.StatusCode != 200 || body != "rl" {
		t.Fatalf("valid rate limit: %d %q", resp.StatusCode, body)
	}
	if n := e.cat.InvalidRateLimits(); n != 0 {
		t.Errorf("InvalidRateLimits = %d, want 0", n)
	}
}

// TestRequestBodyIdleTimeout: a client that stops sending its body gets
// 408 (flag SI) once the idle timeout passes, and its upstream request
// ends; a client quiet while its response streams is not cut.
func TestRequestBodyIdleTimeout(t *testing.T) {
	e := newEnv(t)
	e.proxy.bodyIdle = 300 * time.Millisecond
	var held atomic.Int32
	e.service("up", 80, "http2", backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		held.Add(1)
		defer held.Add(-1)
		if r.URL.Path == "/stream" {
			rc := http.NewResponseController(w)
			for range 10 { // 1 s of response while the client is quiet
				_, _ = io.WriteString(w, "tick ")
				_ = rc.Flush()
				time.Sleep(100 * time.Millisecond)
			}
		}
		b, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		_, _ = w.Write(b)
	})))
	e.waypoint(&discoveryv1.WaypointService{Service: key("up")})
	url := e.front("up", 80, false)
	for _, cl := range clients(t) {
		t.Run(cl.name, func(t *testing.T) {
			upload := func(path string, pause time.Duration) (int, string, error) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				pr, pw := io.Pipe()
				go func() {
					_, _ = io.WriteString(pw, "begin ")
					select {
					case <-time.After(pause):
						_, _ = io.WriteString(pw, "end")
						pw.Close()
					case <-ctx.Done():
						pw.CloseWithError(ctx.Err())
					}
				}()
				req, _ := http.NewRequestWithContext(ctx, "POST", url+path, pr)
				resp, err := cl.c.Do(req)
				if err != nil {
					return 0, "", err
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				return resp.StatusCode, string(b), err
			}
			if code, body, err := upload("/stalled", time.Hour); err != nil || code != http.StatusRequestTimeout || body != "stream timeout" {
				t.Fatalf("stalled body: %d %q %v", code, body, err)
			}
			for deadline := time.Now().Add(3 * time.Second); held.Load() != 0 && time.Now().Before(deadline); {
				time.Sleep(10 * time.Millisecond)
			}
			if n := held.Load(); n != 0 {
				t.Fatalf("%d upstream requests held after the body stalled", n)
			}
			if code, body, err := upload("/stream", 1200*time.Millisecond); err != nil || code != 200 || body != strings.Repeat("tick ", 10)+"begin end" {
				t.Fatalf("quiet client of a streaming response: %d %q %v", code, body, err)
			}
		})
	}
	if !hasFlag(t, e, "SI") {
		t.Error("no istio_requests_total with response_flags=SI")
	}
}

// TestFullDuplexHTTP1: an HTTP/1.1 client may read its response while it
// still sends its body (as Envoy allows); the waypoint's server must not
// consume the rest of the body itself before writing the response.
func TestFullDuplexHTTP1(t *testing.T) {
	e := newEnv(t)
	e.proxy.bodyIdle = 0 // no idle timeout: this is about the body alone
	e.service("up", 80, "http", backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		_ = rc.EnableFullDuplex()
		_, _ = io.WriteString(w, "ready ")
		_ = rc.Flush()
		b, _ := io.ReadAll(r.Body)
		_, _ = w.Write(b)
	})))
	e.waypoint(&discoveryv1.WaypointService{Service: key("up")})
	url := e.front("up", 80, false)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pr, pw := io.Pipe()
	go func() { <-ctx.Done(); pw.CloseWithError(ctx.Err()) }()
	go func() { _, _ = io.WriteString(pw, "begin ") }()
	req, _ := http.NewRequestWithContext(ctx, "POST", url+"/", pr)
	resp, err := (&http.Client{Transport: &http.Transport{}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	first := make([]byte, len("ready "))
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatalf("response before the body ended: %v", err)
	}
	_, _ = io.WriteString(pw, "end")
	pw.Close()
	rest, err := io.ReadAll(resp.Body)
	if err != nil || string(rest) != "begin end" {
		t.Fatalf("upstream echoed %q %v, want the whole body", rest, err)
	}
}

// TestRetryAfterSlowFailureBody: the body of a failed attempt is drained
// before a retry (to reuse the connection) only briefly: an upstream that
// trickles its 503 body does not hold the retry back.
func TestRetryAfterSlowFailureBody(t *testing.T) {
	e := newEnv(t)
	var calls atomic.Int32
	e.service("up", 80, "http", backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) > 1 {
			_, _ = io.WriteString(w, "ok")
			return
		}
		w.WriteHeader(503)
		rc := http.NewResponseController(w)
		for {
			if _, err := io.WriteString(w, "x"); err != nil || rc.Flush() != nil {
				return
			}
			select {
			case <-time.After(10 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
		}
	})))
	e.waypoint(&discoveryv1.WaypointService{Service: key("up"), HttpRoutes: []*discoveryv1.HTTPRoute{{Namespace: "default", Name: "r",
		Rules: []*discoveryv1.HTTPRouteRule{{
			Backends: []*discoveryv1.BackendRef{{Service: key("up"), Port: 80, Weight: 1}},
			Retry:    &discoveryv1.RetryPolicy{Attempts: 1, Codes: []uint32{503}, Backoff: durationpb.New(time.Millisecond)},
		}}}}})
	url := e.front("up", 80, false)
	start := time.Now()
	resp, body := get(t, &http.Client{Timeout: 5 * time.Second}, url+"/")
	if resp.StatusCode != 200 || body != "ok" || time.Since(start) > 2*time.Second {
		t.Fatalf("retry after a trickled 503 body: %d %q after %v", resp.StatusCode, body, time.Since(start))
	}
}
