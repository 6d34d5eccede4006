package sample

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
)

// ServedBy names the instance that answered.
type ServedBy struct {
	Service   string `json:"service"`
	Version   string `json:"version"`
	Pod       string `json:"pod"`
	Namespace string `json:"namespace"`
}

// Peer is what an instance saw of its client.
type Peer struct {
	// RemoteAddr is the client address of the connection (ip:port): with
	// ztunnel's IP_TRANSPARENT it is the source pod's address.
	RemoteAddr string `json:"remoteAddr"`
	// Headers are the request headers a mesh or a proxy may add or that
	// carry context (x-forwarded-*, forwarded, tracing, end-user, x-amesh-*).
	Headers map[string]string `json:"headers,omitempty"`
}

// Echo is the whole request, returned by /echo and with x-amesh-echo.
type Echo struct {
	Method   string              `json:"method"`
	Path     string              `json:"path"`
	RawQuery string              `json:"rawQuery,omitempty"`
	Host     string              `json:"host"`
	Proto    string              `json:"proto"`
	Headers  map[string][]string `json:"headers"`
	// BodyBytes is the request body's length (read up to maxEchoBody).
	BodyBytes int64 `json:"bodyBytes"`
	// Body is the body's beginning (up to maxEchoBodyShown bytes).
	Body string `json:"body,omitempty"`
}

// Error is the body of every error response.
type Error struct {
	Error    string   `json:"error"`
	ServedBy ServedBy `json:"servedBy"`
	// Fault is set when the failure was injected on purpose.
	Fault bool `json:"fault,omitempty"`
}

const (
	maxEchoBody      = 1 << 20
	maxEchoBodyShown = 4 << 10
)

// peerHeaders are shown in Peer.Headers, besides any x-amesh-* and
// x-forwarded-* header.
var peerHeaders = []string{
	"Forwarded", "End-User", "X-Request-Id", "Traceparent", "Tracestate", "Baggage",
	"B3", "X-B3-Traceid", "X-B3-Spanid", "X-B3-Parentspanid", "X-B3-Sampled",
}

// propagated are the request headers productpage and reviews copy to
// their upstream calls (trace context and the user, as bookinfo does).
var propagated = []string{
	"End-User", "X-Request-Id", "Traceparent", "Tracestate", "Baggage",
	"B3", "X-B3-Traceid", "X-B3-Spanid", "X-B3-Parentspanid", "X-B3-Sampled", "X-B3-Flags",
}

// peerOf describes the client of r.
func peerOf(r *http.Request) Peer {
	p := Peer{RemoteAddr: r.RemoteAddr}
	for name, vals := range r.Header {
		lower := strings.ToLower(name)
		keep := strings.HasPrefix(lower, "x-amesh-") || strings.HasPrefix(lower, "x-forwarded-")
		for _, h := range peerHeaders {
			keep = keep || name == h
		}
		if keep {
			if p.Headers == nil {
				p.Headers = make(map[string]string)
			}
			p.Headers[lower] = strings.Join(vals, ", ")
		}
	}
	return p
}

// echoOf reads r's body (bounded) and describes the whole request.
func echoOf(r *http.Request) Echo {
	e := Echo{
		Method: r.Method, Path: r.URL.Path, RawQuery: r.URL.RawQuery, Host: r.Host, Proto: r.Proto,
		Headers: make(map[string][]string, len(r.Header)),
	}
	for k, v := range r.Header {
		e.Headers[strings.ToLower(k)] = v
	}
	if r.Body != nil {
		buf := make([]byte, maxEchoBodyShown)
		n, _ := io.ReadFull(r.Body, buf)
		rest, _ := io.Copy(io.Discard, io.LimitReader(r.Body, maxEchoBody-int64(n)))
		e.Body = string(buf[:n])
		e.BodyBytes = int64(n) + rest
	}
	return e
}

// wantEcho reports whether the request asks for its echo.
func wantEcho(r *http.Request) bool {
	v, err := strconv.ParseBool(r.Header.Get(HeaderEcho))
	return err == nil && v
}

// writeJSON writes v as indented JSON with status code.
func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v) // the client is gone if this fails
}

// setServedBy sets the response headers naming this instance.
func setServedBy(h http.Header, by ServedBy, remote string) {
	h.Set(HeaderService, by.Service)
	h.Set(HeaderVersion, by.Version)
	h.Set(HeaderServedBy, by.Pod)
	h.Set(HeaderPeer, remote)
}

// httpServer is the part every HTTP role shares: identity headers,
// request counting, test knobs, /echo, /stats and health endpoints. Role
// handlers are registered on mux.
type httpServer struct {
	cfg   Config
	by    ServedBy
	log   *zap.Logger
	fail  *failer
	stats *counter
	mux   *http.ServeMux
}

func newHTTPServer(cfg Config, log *zap.Logger, random func() float64) *httpServer {
	return &httpServer{
		cfg: cfg, by: cfg.servedBy(), log: log,
		fail: newFailer(random), stats: newCounter(), mux: http.NewServeMux(),
	}
}

// ServeHTTP implements http.Handler.
func (s *httpServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
	s.serve(rw, r)
	if s.cfg.AccessLog {
		s.log.Info("request", zap.String("method", r.Method), zap.String("path", r.URL.Path),
			zap.String("peer", r.RemoteAddr), zap.String("proto", r.Proto),
			zap.Int("code", rw.code), zap.Duration("duration", time.Since(start)))
	}
}

func (s *httpServer) serve(w http.ResponseWriter, r *http.Request) {
	setServedBy(w.Header(), s.by, r.RemoteAddr)
	switch r.URL.Path {
	case "/healthz", "/readyz":
		writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "servedBy": s.by})
		return
	case "/stats":
		switch r.Method {
		case http.MethodGet, http.MethodHead:
			writeJSON(w, http.StatusOK, s.stats.snapshot(s.by, false))
		case http.MethodDelete: // read and reset
			writeJSON(w, http.StatusOK, s.stats.snapshot(s.by, true))
		default:
			w.Header().Set("Allow", "GET, HEAD, DELETE")
			writeJSON(w, http.StatusMethodNotAllowed, Error{Error: "use GET, or DELETE to reset", ServedBy: s.by})
		}
		return
	}
	s.stats.add(r.Method + " " + r.URL.Path)
	fault, err := s.cfg.Fault.override(s.cfg.Role, r.Header.Get)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, Error{Error: err.Error(), ServedBy: s.by})
		return
	}
	if !sleep(r.Context().Done(), fault.Delay) {
		return // the client went away
	}
	if s.fail.fail(fault.Fail) {
		s.stats.addFailed()
		w.Header().Set(HeaderFault, "abort")
		writeJSON(w, fault.httpCode(), Error{Error: "injected fault", ServedBy: s.by, Fault: true})
		return
	}
	if fault.Delay > 0 {
		w.Header().Set(HeaderFault, "delay")
	}
	if r.URL.Path == "/echo" {
		writeJSON(w, http.StatusOK, struct {
			ServedBy ServedBy `json:"servedBy"`
			Peer     Peer     `json:"peer"`
			Request  Echo     `json:"request"`
		}{s.by, peerOf(r), echoOf(r)})
		return
	}
	s.mux.ServeHTTP(w, r)
}

// notFound answers 404 in JSON.
func (s *httpServer) notFound(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusNotFound, Error{Error: "no route for " + r.Method + " " + r.URL.Path, ServedBy: s.by})
}

// statusWriter records the status code for the access log. It passes
// Flush and Unwrap through so that http.ResponseController still works.
type statusWriter struct {
	http.ResponseWriter
	code  int
	wrote bool
}

func (w *statusWriter) WriteHeader(code int) {
	if !w.wrote {
		w.code, w.wrote = code, true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	w.wrote = true
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// parseID parses the product id path value.
func parseID(r *http.Request) (int, error) {
	v := r.PathValue("id")
	id, err := strconv.Atoi(v)
	if err != nil || id < 0 || id > 1_000_000_000 {
		return 0, errors.New("product id " + strconv.Quote(v) + ": want an integer 0-1000000000")
	}
	return id, nil
}

// copyPropagated copies the propagated headers of from to to.
func copyPropagated(to, from http.Header) {
	for _, h := range propagated {
		if v := from.Values(h); len(v) > 0 {
			to[h] = append([]string(nil), v...)
		}
	}
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
