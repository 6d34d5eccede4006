package sample

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	ratingsv1 "github.com/amesh-dev/amesh/e2e/sample/ratings/v1"
)

// instance is one running App on loopback.
type instance struct {
	addr string
	stop func() error
}

// listen reserves a loopback port.
func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// start runs an instance of cfg on ln until the test ends (and checks it
// stops cleanly).
func start(t *testing.T, ln net.Listener, cfg Config, opts ...Option) instance {
	t.Helper()
	cfg.Pod = fmt.Sprintf("%s-%s-pod", cfg.Role, cfg.Version)
	cfg.Namespace = "bookinfo"
	cfg.DrainTimeout = 2 * time.Second
	app, err := New(cfg, zaptest.NewLogger(t), opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- app.Serve(ctx, ln) }()
	stopped := false
	var serveErr error
	stop := func() error {
		if !stopped {
			stopped = true
			cancel()
			serveErr = <-errc
		}
		return serveErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("%s: Serve: %v", cfg.Role, err)
		}
	})
	return instance{addr: ln.Addr().String(), stop: stop}
}

func config(role Role, version string) Config {
	c := Default()
	c.Role, c.Version = role, version
	return c
}

// bookinfo starts the whole application; reviews has one v1 and one v2
// instance behind the given address (tests call either directly).
type bookinfo struct {
	productpage, details, reviewsV1, reviewsV2, ratings instance
}

func startBookinfo(t *testing.T, mutate func(role Role, version string, c *Config)) bookinfo {
	t.Helper()
	lns := map[string]net.Listener{}
	for _, k := range []string{"productpage", "details", "reviews-v1", "reviews-v2", "ratings"} {
		lns[k] = listen(t)
	}
	cfg := func(role Role, version string) Config {
		c := config(role, version)
		c.DetailsURL = "http://" + lns["details"].Addr().String()
		c.ReviewsURL = "http://" + lns["reviews-v2"].Addr().String()
		c.RatingsAddr = lns["ratings"].Addr().String()
		if mutate != nil {
			mutate(role, version, &c)
		}
		return c
	}
	var b bookinfo
	b.ratings = start(t, lns["ratings"], cfg(RoleRatings, "v1"))
	b.details = start(t, lns["details"], cfg(RoleDetails, "v1"))
	b.reviewsV1 = start(t, lns["reviews-v1"], cfg(RoleReviews, "v1"))
	b.reviewsV2 = start(t, lns["reviews-v2"], cfg(RoleReviews, "v2"))
	b.productpage = start(t, lns["productpage"], cfg(RoleProductPage, "v1"))
	return b
}

// get does one HTTP request and decodes the JSON answer into v (if not nil).
func get(t *testing.T, method, u string, header http.Header, v any) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, vals := range header {
		req.Header[k] = vals
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if v != nil {
		if err := json.Unmarshal(body, v); err != nil {
			t.Fatalf("%s %s: %d %s: decoding: %v", method, u, resp.StatusCode, body, err)
		}
	}
	return resp
}

func TestProductPageEndToEnd(t *testing.T) {
	b := startBookinfo(t, nil)
	var page ProductPage
	resp := get(t, "GET", "http://"+b.productpage.addr+"/productpage?id=7",
		http.Header{"End-User": {"jason"}, "Traceparent": {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}}, &page)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, errors %v", resp.StatusCode, page.Errors)
	}
	if got := resp.Header.Get(HeaderServedBy); got != "productpage-v1-pod" {
		t.Errorf("%s = %q", HeaderServedBy, got)
	}
	if resp.Header.Get(HeaderService) != "productpage" || resp.Header.Get(HeaderVersion) != "v1" {
		t.Errorf("identity headers %v", resp.Header)
	}
	if page.ID != 7 || page.Details == nil || page.Reviews == nil {
		t.Fatalf("page = %+v", page)
	}
	if page.Details.ServedBy != (ServedBy{"details", "v1", "details-v1-pod", "bookinfo"}) {
		t.Errorf("details served by %+v", page.Details.ServedBy)
	}
	if page.Reviews.ServedBy.Version != "v2" || page.Reviews.Rating == nil {
		t.Fatalf("reviews = %+v", page.Reviews)
	}
	if page.Reviews.Rating.ServedBy.Service != "ratings" || page.Reviews.Reviews[0].Stars < 1 || page.Reviews.Reviews[0].Stars > 5 {
		t.Errorf("rating = %+v, reviews %+v", page.Reviews.Rating, page.Reviews.Reviews)
	}
	// Each hop saw its client's loopback address, and the user and trace
	// context travelled along.
	for name, p := range map[string]Peer{"productpage": page.Peer, "details": page.Details.Peer, "reviews": page.Reviews.Peer} {
		if !strings.HasPrefix(p.RemoteAddr, "127.0.0.1:") {
			t.Errorf("%s saw peer %q", name, p.RemoteAddr)
		}
		if p.Headers["end-user"] != "jason" || !strings.HasPrefix(p.Headers["traceparent"], "00-0af765") {
			t.Errorf("%s saw headers %v", name, p.Headers)
		}
	}
	if !strings.HasPrefix(page.Reviews.Rating.Peer, "127.0.0.1:") {
		t.Errorf("ratings saw peer %q", page.Reviews.Rating.Peer)
	}

	// The text page names every hop.
	resp = get(t, "GET", "http://"+b.productpage.addr+"/productpage?format=text", nil, nil)
	req, _ := http.NewRequest("GET", "http://"+b.productpage.addr+"/?format=text", nil)
	r2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	text, _ := io.ReadAll(r2.Body)
	r2.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(r2.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("text page: %d %s", r2.StatusCode, r2.Header.Get("Content-Type"))
	}
	for _, want := range []string{"productpage v1", "details v1", "reviews v2", "ratings v1", "★"} {
		if !strings.Contains(string(text), want) {
			t.Errorf("text page lacks %q:\n%s", want, text)
		}
	}
}

func TestProductPageReportsUpstreamFailure(t *testing.T) {
	b := startBookinfo(t, func(role Role, _ string, c *Config) {
		if role == RoleDetails {
			c.Fault.Fail = FailSpec{Fraction: 1} // every request, from the pod's env
		}
	})
	var page ProductPage
	resp := get(t, "GET", "http://"+b.productpage.addr+"/productpage", nil, &page)
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", resp.StatusCode)
	}
	if msg := page.Errors["details"]; !strings.Contains(msg, "503") || !strings.Contains(msg, "details-v1-pod") || !strings.Contains(msg, "injected fault") {
		t.Errorf("details error %q", msg)
	}
	if page.Details != nil || page.Reviews == nil {
		t.Errorf("partial page = %+v", page)
	}
}

func TestReviewsV2ReportsRatingsFailure(t *testing.T) {
	b := startBookinfo(t, nil)
	// Stop ratings: reviews v2 answers 502 naming ratings; v1 does not call it.
	if err := b.ratings.stop(); err != nil {
		t.Fatal(err)
	}
	var rv Reviews
	if resp := get(t, "GET", "http://"+b.reviewsV2.addr+"/reviews/1", nil, &rv); resp.StatusCode != http.StatusBadGateway || rv.Errors["ratings"] == "" {
		t.Errorf("reviews v2 without ratings: %d %+v", resp.StatusCode, rv)
	}
	if resp := get(t, "GET", "http://"+b.reviewsV1.addr+"/reviews/1", nil, &rv); resp.StatusCode != http.StatusOK || rv.Rating != nil {
		t.Errorf("reviews v1: %d %+v", resp.StatusCode, rv)
	}
}

func TestHTTPKnobs(t *testing.T) {
	inst := start(t, listen(t), config(RoleDetails, "v1"))
	base := "http://" + inst.addr

	// Deterministic failures with a chosen code; then the counters.
	codes := ""
	for range 6 {
		var e Error
		resp := get(t, "GET", base+"/details/1", http.Header{HeaderFail: {"1/3"}, HeaderFailCode: {"500"}}, &e)
		codes += fmt.Sprintf("%d ", resp.StatusCode)
		if resp.StatusCode == 500 && (!e.Fault || resp.Header.Get(HeaderFault) != "abort") {
			t.Errorf("injected failure not marked: %+v %v", e, resp.Header)
		}
	}
	if want := "500 200 200 500 200 200 "; codes != want {
		t.Errorf("codes %s, want %s", codes, want)
	}

	// Delay, measured.
	t0 := time.Now()
	resp := get(t, "GET", base+"/details/1", http.Header{HeaderDelay: {"150ms"}}, nil)
	if took := time.Since(t0); resp.StatusCode != 200 || took < 150*time.Millisecond || resp.Header.Get(HeaderFault) != "delay" {
		t.Errorf("delayed request: %d after %s", resp.StatusCode, took)
	}

	// Malformed knobs are refused with a reason.
	var e Error
	if resp := get(t, "GET", base+"/details/1", http.Header{HeaderDelay: {"forever"}}, &e); resp.StatusCode != 400 || !strings.Contains(e.Error, HeaderDelay) {
		t.Errorf("bad knob: %d %+v", resp.StatusCode, e)
	}
	if resp := get(t, "GET", base+"/details/x", nil, &e); resp.StatusCode != 400 {
		t.Errorf("bad id: %d %+v", resp.StatusCode, e)
	}
	if resp := get(t, "GET", base+"/nowhere", nil, &e); resp.StatusCode != 404 {
		t.Errorf("unknown path: %d %+v", resp.StatusCode, e)
	}

	// Counters: 6 + 1 + 1 + 1 + 1 requests, 2 injected failures; health
	// and stats requests are not counted. DELETE reads and resets.
	get(t, "GET", base+"/healthz", nil, nil)
	var st Stats
	get(t, "DELETE", base+"/stats", nil, &st)
	if st.Total != 10 || st.Failed != 2 || st.ByKey["GET /details/1"] != 8 || st.ByKey["GET /nowhere"] != 1 {
		t.Errorf("stats = %+v", st)
	}
	if st.ServedBy.Pod != "details-v1-pod" {
		t.Errorf("stats served by %+v", st.ServedBy)
	}
	st = Stats{}
	get(t, "GET", base+"/stats", nil, &st)
	if st.Total != 0 || len(st.ByKey) != 0 {
		t.Errorf("stats after reset = %+v", st)
	}
}

func TestEcho(t *testing.T) {
	inst := start(t, listen(t), config(RoleDetails, "v1"))
	req, _ := http.NewRequest("POST", "http://"+inst.addr+"/echo?a=1", strings.NewReader("hello mesh"))
	req.Header.Set("X-Custom", "v")
	req.Host = "details.bookinfo:9080"
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got struct {
		ServedBy ServedBy
		Peer     Peer
		Request  Echo
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	r := got.Request
	if r.Method != "POST" || r.Path != "/echo" || r.RawQuery != "a=1" || r.Host != "details.bookinfo:9080" ||
		r.Body != "hello mesh" || r.BodyBytes != 10 || r.Headers["x-custom"][0] != "v" {
		t.Errorf("echo = %+v", r)
	}

	// x-amesh-echo adds the request to a role's own answer.
	var d Details
	get(t, "GET", "http://"+inst.addr+"/details/3", http.Header{HeaderEcho: {"true"}, "X-Forwarded-For": {"10.1.2.3"}}, &d)
	if d.Request == nil || d.Request.Path != "/details/3" || d.Peer.Headers["x-forwarded-for"] != "10.1.2.3" {
		t.Errorf("details with echo = %+v", d)
	}
}

// TestH2C checks that the HTTP roles speak HTTP/2 without TLS, as a
// waypoint may upstream.
func TestH2C(t *testing.T) {
	inst := start(t, listen(t), config(RoleDetails, "v1"))
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	client := &http.Client{Transport: &http.Transport{Protocols: &p, TLSClientConfig: &tls.Config{}}}
	resp, err := client.Get("http://" + inst.addr + "/details/1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 2 || resp.StatusCode != 200 || resp.Header.Get(HeaderServedBy) == "" {
		t.Errorf("h2c: %s %d", resp.Proto, resp.StatusCode)
	}
}

func TestRatingsGRPC(t *testing.T) {
	inst := start(t, listen(t), config(RoleRatings, "v1"))
	conn, err := grpc.NewClient(inst.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, svc := range []string{"", "amesh.sample.ratings.v1.Ratings"} {
		h, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || h.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health %q: %v %v", svc, h, err)
		}
	}

	c := ratingsv1.NewRatingsClient(conn)
	var header metadata.MD
	resp, err := c.GetRating(ctx, &ratingsv1.GetRatingRequest{ProductId: "7"}, grpc.Header(&header))
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetStars() < 1 || resp.GetStars() > 5 || resp.GetServedBy().GetPod() != "ratings-v1-pod" || !strings.HasPrefix(resp.GetPeer(), "127.0.0.1:") {
		t.Errorf("GetRating = %v", resp)
	}
	if header.Get(HeaderServedBy)[0] != "ratings-v1-pod" || header.Get(HeaderVersion)[0] != "v1" {
		t.Errorf("header metadata %v", header)
	}

	// Knobs through metadata: deterministic failure with the default and a chosen code.
	fctx := metadata.AppendToOutgoingContext(ctx, HeaderFail, "1/1")
	if _, err := c.GetRating(fctx, &ratingsv1.GetRatingRequest{ProductId: "7"}, grpc.Header(&header)); status.Code(err) != codes.Unavailable || header.Get(HeaderFault)[0] != "abort" {
		t.Errorf("injected failure: %v, header %v", err, header)
	}
	fctx = metadata.AppendToOutgoingContext(ctx, HeaderFail, "1", HeaderFailCode, "8")
	if _, err := c.GetRating(fctx, &ratingsv1.GetRatingRequest{ProductId: "7"}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("injected failure with code 8: %v", err)
	}
	fctx = metadata.AppendToOutgoingContext(ctx, HeaderFailCode, "503")
	if _, err := c.GetRating(fctx, &ratingsv1.GetRatingRequest{ProductId: "7"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("HTTP code on ratings: %v", err)
	}
	if _, err := c.GetRating(ctx, &ratingsv1.GetRatingRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("empty product id: %v", err)
	}
	t0 := time.Now()
	dctx := metadata.AppendToOutgoingContext(ctx, HeaderDelay, "100ms")
	if _, err := c.GetRating(dctx, &ratingsv1.GetRatingRequest{ProductId: "1"}); err != nil || time.Since(t0) < 100*time.Millisecond {
		t.Errorf("delayed call: %v after %s", err, time.Since(t0))
	}

	st, err := c.Stats(ctx, &ratingsv1.StatsRequest{Reset_: true})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetTotal() != 6 || st.GetByMethod()[ratingsv1.Ratings_GetRating_FullMethodName] != 6 {
		t.Errorf("stats = %v", st)
	}
	if st, _ = c.Stats(ctx, &ratingsv1.StatsRequest{}); st.GetTotal() != 0 {
		t.Errorf("stats after reset = %v", st)
	}
}

// TestDrain checks that stopping an instance lets an in-flight request
// finish and refuses new connections afterwards.
func TestDrain(t *testing.T) {
	inst := start(t, listen(t), config(RoleDetails, "v1"))
	done := make(chan *http.Response, 1)
	go func() {
		req, _ := http.NewRequest("GET", "http://"+inst.addr+"/details/1", nil)
		req.Header.Set(HeaderDelay, "500ms")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Errorf("in-flight request: %v", err)
			done <- nil
			return
		}
		resp.Body.Close()
		done <- resp
	}()
	// Wait until the request is in its delay (it is counted on arrival).
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var st Stats
		if get(t, "GET", "http://"+inst.addr+"/stats", nil, &st); st.Total == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the delayed request never arrived")
		}
	}
	if err := inst.stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if resp := <-done; resp == nil || resp.StatusCode != 200 {
		t.Errorf("in-flight request during drain: %v", resp)
	}
	if _, err := net.DialTimeout("tcp", inst.addr, time.Second); err == nil {
		t.Error("still accepting after drain")
	}
}

func TestClientRun(t *testing.T) {
	b := startBookinfo(t, nil)
	cl := start(t, listen(t), config(RoleClient, "v1"))
	run := func(q url.Values) (LoadResult, int) {
		var res LoadResult
		resp := get(t, "GET", "http://"+cl.addr+"/run?"+q.Encode(), nil, &res)
		return res, resp.StatusCode
	}

	// Deterministic failures: exactly 2 of 8 reach the client as faults.
	res, code := run(url.Values{
		"url": {"http://" + b.reviewsV1.addr + "/reviews/1"}, "n": {"8"}, "c": {"2"},
		"h": {HeaderFail + ": 1/4"},
	})
	if code != 200 || res.Requests != 8 || res.OK != 6 || res.Faults != 2 || res.Codes["503"] != 2 ||
		res.ServedBy["reviews-v1-pod"] != 8 || res.Versions["reviews/v1"] != 8 {
		t.Errorf("run = %d %+v", code, res)
	}
	if res.LatencyMs.Max <= 0 || res.LatencyMs.P50 > res.LatencyMs.P99 {
		t.Errorf("latency = %+v", res.LatencyMs)
	}

	// Fields from productpage's body: which reviews version answered.
	res, _ = run(url.Values{
		"url": {"http://" + b.productpage.addr + "/productpage"}, "n": {"5"}, "newconn": {"true"},
		"field": {"reviews.servedBy.version", "details.year"},
	})
	if res.OK != 5 || res.Fields["reviews.servedBy.version"]["v2"] != 5 || res.Fields["details.year"]["1595"] != 5 {
		t.Errorf("fields run = %+v", res)
	}

	// gRPC against ratings, rate limited for a duration.
	res, _ = run(url.Values{"grpc": {b.ratings.addr}, "duration": {"500ms"}, "qps": {"20"}})
	if res.Requests < 5 || res.Requests > 12 || res.OK != res.Requests || res.ServedBy["ratings-v1-pod"] != res.Requests {
		t.Errorf("grpc run = %+v", res)
	}

	// A dead target is counted as errors, not hidden.
	dead := listen(t)
	deadAddr := dead.Addr().String()
	dead.Close()
	res, _ = run(url.Values{"url": {"http://" + deadAddr + "/"}, "n": {"3"}})
	if res.Requests != 3 || res.Codes["error"] != 3 || len(res.Errors) == 0 {
		t.Errorf("dead target run = %+v", res)
	}

	var e Error
	if resp := get(t, "GET", "http://"+cl.addr+"/run?n=1", nil, &e); resp.StatusCode != 400 || !strings.Contains(e.Error, "url") {
		t.Errorf("bad run: %d %+v", resp.StatusCode, e)
	}
}

func TestParseLoad(t *testing.T) {
	tests := []struct {
		q       string
		wantErr string
		check   func(Load) error
	}{
		{q: "url=http://r:9080/&n=10&c=4&qps=50&h=End-User:%20jason&h=x-amesh-fail:1/2&timeout=2s&newconn=1",
			check: func(l Load) error {
				if l.N != 10 || l.Concurrency != 4 || l.QPS != 50 || l.Timeout != 2*time.Second || !l.NewConn ||
					l.Header.Get("End-User") != "jason" || l.Header.Get("X-Amesh-Fail") != "1/2" {
					return errors.New("wrong values")
				}
				return nil
			}},
		{q: "grpc=ratings:9080&duration=10s"},
		{q: "n=1", wantErr: "url and grpc"},
		{q: "url=http://a/&grpc=b:1&n=1", wantErr: "url and grpc"},
		{q: "url=ftp://a/&n=1", wantErr: "http(s)"},
		{q: "grpc=ratings&n=1", wantErr: "grpc"},
		{q: "url=http://a/", wantErr: "n and duration"},
		{q: "url=http://a/&n=1&duration=1s", wantErr: "n and duration"},
		{q: "url=http://a/&n=0", wantErr: "n \"0\""},
		{q: "url=http://a/&n=2000000", wantErr: "n \"2000000\""},
		{q: "url=http://a/&n=1&c=1000", wantErr: "c \"1000\""},
		{q: "url=http://a/&duration=1h", wantErr: "duration"},
		{q: "url=http://a/&n=1&qps=-1", wantErr: "qps"},
		{q: "url=http://a/&n=1&h=nocolon", wantErr: "h \"nocolon\""},
		{q: "url=http://a/&n=1&h=bad%20name:v", wantErr: "h \"bad name:v\""},
		{q: "grpc=a:1&n=1&method=POST", wantErr: "method"},
		{q: "grpc=a:1&n=1&field=x", wantErr: "field"},
		{q: "url=http://a/&n=1&field=a..b", wantErr: "field"},
	}
	for _, tt := range tests {
		q, err := url.ParseQuery(tt.q)
		if err != nil {
			t.Fatal(err)
		}
		l, err := ParseLoad(q)
		switch {
		case tt.wantErr == "" && err != nil:
			t.Errorf("%s: %v", tt.q, err)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("%s: error %v, want one about %q", tt.q, err, tt.wantErr)
		case tt.check != nil && err == nil:
			if err := tt.check(l); err != nil {
				t.Errorf("%s: %v: %+v", tt.q, err, l)
			}
		}
	}
}

func TestLookup(t *testing.T) {
	var doc any
	if err := json.Unmarshal([]byte(`{"a":{"b":"x","n":3,"o":{"k":true}},"s":"top"}`), &doc); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		path string
		want string
		ok   bool
	}{
		{"a.b", "x", true},
		{"a.n", "3", true},
		{"a.o", `{"k":true}`, true},
		{"s", "top", true},
		{"a.missing", "", false},
		{"s.deeper", "", false},
	}
	for _, tt := range tests {
		got, ok := lookup(doc, tt.path)
		if got != tt.want || ok != tt.ok {
			t.Errorf("lookup(%q) = %q, %v; want %q, %v", tt.path, got, ok, tt.want, tt.ok)
		}
	}
}
