package sample

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	ratingsv1 "github.com/amesh-dev/amesh/e2e/sample/ratings/v1"
)

// Bounds of one load run.
const (
	maxLoadRequests    = 1_000_000
	maxLoadDuration    = 10 * time.Minute
	maxLoadConcurrency = 256
	maxLoadQPS         = 100_000
	maxErrorKeys       = 32
	maxFieldKeys       = 64
)

// Load is one traffic run of the client role, from the query of
// GET /run: url=<http(s) URL> or grpc=<host:port> (ratings GetRating),
// n=<requests> or duration=<Go duration>, c=<concurrency>, qps=<rate, 0
// unlimited>, h=<"Name: value">… (request headers or gRPC metadata),
// method=<HTTP method>, timeout=<per request>, newconn=true (a new
// connection per request, so that L4 balancing shows), field=<dotted JSON
// path>… (count the values found in HTTP answers, e.g.
// reviews.servedBy.version for productpage).
type Load struct {
	URL         string
	GRPC        string
	N           int
	Duration    time.Duration
	Concurrency int
	QPS         float64
	Header      http.Header
	Method      string
	Timeout     time.Duration
	NewConn     bool
	Fields      []string
}

// ParseLoad parses and checks a /run query.
func ParseLoad(q url.Values) (Load, error) {
	l := Load{N: 0, Concurrency: 1, Method: http.MethodGet, Timeout: 5 * time.Second, Header: http.Header{}}
	var errs []error
	l.URL, l.GRPC = q.Get("url"), q.Get("grpc")
	switch {
	case (l.URL == "") == (l.GRPC == ""):
		errs = append(errs, errors.New("give exactly one of url and grpc"))
	case l.URL != "":
		if u, err := url.Parse(l.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("url %q: want an http(s) URL", l.URL))
		}
	default:
		if _, _, err := net.SplitHostPort(l.GRPC); err != nil {
			errs = append(errs, fmt.Errorf("grpc %q: %w", l.GRPC, err))
		}
	}
	intParam := func(name string, dst *int, lo, hi int) {
		if v := q.Get(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < lo || n > hi {
				errs = append(errs, fmt.Errorf("%s %q: want an integer %d-%d", name, v, lo, hi))
				return
			}
			*dst = n
		}
	}
	durParam := func(name string, dst *time.Duration, hi time.Duration) {
		if v := q.Get(name); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 || d > hi {
				errs = append(errs, fmt.Errorf("%s %q: want a duration up to %s", name, v, hi))
				return
			}
			*dst = d
		}
	}
	intParam("n", &l.N, 1, maxLoadRequests)
	intParam("c", &l.Concurrency, 1, maxLoadConcurrency)
	durParam("duration", &l.Duration, maxLoadDuration)
	durParam("timeout", &l.Timeout, time.Minute)
	if (l.N == 0) == (l.Duration == 0) {
		errs = append(errs, errors.New("give exactly one of n and duration"))
	}
	if v := q.Get("qps"); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || !(f >= 0 && f <= maxLoadQPS) {
			errs = append(errs, fmt.Errorf("qps %q: want a number 0-%d", v, maxLoadQPS))
		} else {
			l.QPS = f
		}
	}
	if v := q.Get("method"); v != "" {
		if l.GRPC != "" {
			errs = append(errs, errors.New("method applies to url only"))
		}
		l.Method = strings.ToUpper(v)
	}
	for _, h := range q["h"] {
		name, value, ok := strings.Cut(h, ":")
		name = strings.TrimSpace(name)
		if !ok || name == "" || strings.ContainsAny(name, " \t\r\n") || strings.ContainsAny(value, "\r\n") {
			errs = append(errs, fmt.Errorf("h %q: want \"Name: value\"", h))
			continue
		}
		l.Header.Add(textproto.CanonicalMIMEHeaderKey(name), strings.TrimSpace(value))
	}
	if v := q.Get("newconn"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("newconn %q: %w", v, err))
		}
		l.NewConn = b
	}
	for _, f := range q["field"] {
		if f == "" || strings.Contains(f, "..") || strings.HasPrefix(f, ".") || strings.HasSuffix(f, ".") {
			errs = append(errs, fmt.Errorf("field %q: want a dotted JSON path", f))
			continue
		}
		if l.GRPC != "" {
			errs = append(errs, errors.New("field applies to url only"))
			break
		}
		l.Fields = append(l.Fields, f)
	}
	return l, errors.Join(errs...)
}

// Latency summarises request latencies in milliseconds.
type Latency struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

// LoadResult is what a run measured.
type LoadResult struct {
	Requests int64 `json:"requests"`
	// OK counts 2xx answers (HTTP) or OK (gRPC).
	OK int64 `json:"ok"`
	// Codes counts HTTP statuses or gRPC code names; "error" for requests
	// that got no answer.
	Codes map[string]int64 `json:"codes"`
	// ServedBy counts answers per pod (x-amesh-served-by).
	ServedBy map[string]int64 `json:"servedBy"`
	// Versions counts answers per "service/version".
	Versions map[string]int64 `json:"versions"`
	// Faults counts the answers that were injected failures.
	Faults int64 `json:"faults"`
	// Fields counts, per requested field, the values found in answers.
	Fields map[string]map[string]int64 `json:"fields,omitempty"`
	// Errors counts transport errors by message.
	Errors     map[string]int64 `json:"errors,omitempty"`
	LatencyMs  Latency          `json:"latencyMs"`
	DurationMs float64          `json:"durationMs"`
}

// tally collects the outcomes of one worker.
type tally struct {
	r         LoadResult
	latencies []time.Duration
}

func newTally() *tally {
	return &tally{r: LoadResult{
		Codes: map[string]int64{}, ServedBy: map[string]int64{}, Versions: map[string]int64{},
		Fields: map[string]map[string]int64{}, Errors: map[string]int64{},
	}}
}

// outcome is one request's result.
type outcome struct {
	code     string
	ok       bool
	header   func(string) string
	err      error
	fields   map[string]string
	duration time.Duration
}

func bump(m map[string]int64, key string, limit int) {
	if _, ok := m[key]; !ok && len(m) >= limit {
		key = otherKey
	}
	m[key]++
}

func (t *tally) add(o outcome) {
	t.r.Requests++
	t.latencies = append(t.latencies, o.duration)
	if o.err != nil {
		t.r.Codes["error"]++
		msg := o.err.Error()
		if len(msg) > 200 {
			msg = msg[:200]
		}
		bump(t.r.Errors, msg, maxErrorKeys)
		return
	}
	t.r.Codes[o.code]++
	if o.ok {
		t.r.OK++
	}
	if pod := o.header(HeaderServedBy); pod != "" {
		bump(t.r.ServedBy, pod, maxFieldKeys)
	}
	if svc, v := o.header(HeaderService), o.header(HeaderVersion); svc != "" || v != "" {
		bump(t.r.Versions, svc+"/"+v, maxFieldKeys)
	}
	if o.header(HeaderFault) == "abort" {
		t.r.Faults++
	}
	for f, v := range o.fields {
		if t.r.Fields[f] == nil {
			t.r.Fields[f] = map[string]int64{}
		}
		bump(t.r.Fields[f], v, maxFieldKeys)
	}
}

func (t *tally) merge(o *tally) {
	t.r.Requests += o.r.Requests
	t.r.OK += o.r.OK
	t.r.Faults += o.r.Faults
	for k, v := range o.r.Codes {
		t.r.Codes[k] += v
	}
	for _, pair := range [][2]map[string]int64{{t.r.ServedBy, o.r.ServedBy}, {t.r.Versions, o.r.Versions}, {t.r.Errors, o.r.Errors}} {
		for k, v := range pair[1] {
			pair[0][k] += v
		}
	}
	for f, m := range o.r.Fields {
		if t.r.Fields[f] == nil {
			t.r.Fields[f] = map[string]int64{}
		}
		for k, v := range m {
			t.r.Fields[f][k] += v
		}
	}
	t.latencies = append(t.latencies, o.latencies...)
}

func (t *tally) result(elapsed time.Duration) LoadResult {
	r := t.r
	r.DurationMs = ms(elapsed)
	if len(t.latencies) > 0 {
		slices.Sort(t.latencies)
		at := func(q float64) float64 { return ms(t.latencies[int(q*float64(len(t.latencies)-1))]) }
		r.LatencyMs = Latency{P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: ms(t.latencies[len(t.latencies)-1])}
	}
	if len(r.Fields) == 0 {
		r.Fields = nil
	}
	if len(r.Errors) == 0 {
		r.Errors = nil
	}
	return r
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// RunLoad drives l and reports what it measured. It returns early, with
// what it measured so far, when ctx ends.
func RunLoad(ctx context.Context, l Load) (LoadResult, error) {
	var do func(ctx context.Context) outcome
	if l.URL != "" {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = l.Concurrency
		t.DisableKeepAlives = l.NewConn
		defer t.CloseIdleConnections()
		client := &http.Client{Transport: t, Timeout: l.Timeout}
		do = func(ctx context.Context) outcome { return doHTTP(ctx, client, l) }
	} else {
		conn, err := grpc.NewClient(l.GRPC, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return LoadResult{}, fmt.Errorf("grpc client %s: %w", l.GRPC, err)
		}
		defer conn.Close()
		client := ratingsv1.NewRatingsClient(conn)
		md := metadata.MD{}
		for k, v := range l.Header {
			md.Set(strings.ToLower(k), v...)
		}
		do = func(ctx context.Context) outcome { return doGRPC(ctx, client, md, l.Timeout) }
	}
	var limiter *rate.Limiter
	if l.QPS > 0 {
		limiter = rate.NewLimiter(rate.Limit(l.QPS), 1)
	}
	if l.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, l.Duration)
		defer cancel()
	}
	budget := int64(l.N)
	if budget == 0 {
		budget = maxLoadRequests
	}
	var claimed atomic.Int64
	tallies := make([]*tally, l.Concurrency)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range tallies {
		t := newTally()
		tallies[i] = t
		wg.Go(func() {
			for ctx.Err() == nil && claimed.Add(1) <= budget {
				if limiter != nil && limiter.Wait(ctx) != nil {
					return
				}
				o := do(ctx)
				if ctx.Err() != nil && l.Duration > 0 && o.err != nil {
					return // cut off by the end of the run, not a failure
				}
				t.add(o)
			}
		})
	}
	wg.Wait()
	total := newTally()
	for _, t := range tallies {
		total.merge(t)
	}
	return total.result(time.Since(start)), nil
}

func doHTTP(ctx context.Context, client *http.Client, l Load) outcome {
	req, err := http.NewRequestWithContext(ctx, l.Method, l.URL, nil)
	if err != nil {
		return outcome{err: err}
	}
	for k, v := range l.Header {
		req.Header[k] = v
	}
	if h := l.Header.Get("Host"); h != "" {
		req.Host = h
	}
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return outcome{err: err, duration: time.Since(start)}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxUpstreamBody))
	o := outcome{
		code: strconv.Itoa(resp.StatusCode), ok: resp.StatusCode/100 == 2,
		header: resp.Header.Get, duration: time.Since(start),
	}
	if err != nil {
		return outcome{err: fmt.Errorf("reading the answer: %w", err), duration: o.duration}
	}
	if len(l.Fields) > 0 {
		var doc any
		if json.Unmarshal(body, &doc) == nil {
			o.fields = make(map[string]string, len(l.Fields))
			for _, f := range l.Fields {
				if v, ok := lookup(doc, f); ok {
					o.fields[f] = v
				}
			}
		}
	}
	return o
}

func doGRPC(ctx context.Context, client ratingsv1.RatingsClient, md metadata.MD, timeout time.Duration) outcome {
	ctx, cancel := context.WithTimeout(metadata.NewOutgoingContext(ctx, md), timeout)
	defer cancel()
	var header metadata.MD
	start := time.Now()
	_, err := client.GetRating(ctx, &ratingsv1.GetRatingRequest{ProductId: "0"}, grpc.Header(&header))
	st, _ := status.FromError(err)
	return outcome{
		code: st.Code().String(), ok: err == nil, duration: time.Since(start),
		header: func(k string) string { return strings.Join(header.Get(k), ",") },
	}
}

// lookup finds a dotted path in a decoded JSON document and renders the
// value found (strings as they are, anything else as JSON).
func lookup(doc any, path string) (string, bool) {
	for part := range strings.SplitSeq(path, ".") {
		m, ok := doc.(map[string]any)
		if !ok {
			return "", false
		}
		if doc, ok = m[part]; !ok {
			return "", false
		}
	}
	if s, ok := doc.(string); ok {
		return s, true
	}
	b, err := json.Marshal(doc)
	return string(b), err == nil
}

// registerClient adds the client role's routes.
func (s *httpServer) registerClient() {
	s.mux.HandleFunc("GET /run", func(w http.ResponseWriter, r *http.Request) {
		l, err := ParseLoad(r.URL.Query())
		if err != nil {
			writeJSON(w, http.StatusBadRequest, Error{Error: err.Error(), ServedBy: s.by})
			return
		}
		res, err := RunLoad(r.Context(), l)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, Error{Error: err.Error(), ServedBy: s.by})
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	s.mux.HandleFunc("/", s.notFound)
}
