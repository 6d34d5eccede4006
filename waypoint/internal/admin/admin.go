// Package admin serves the waypoint's operational endpoints: readiness
// (/healthz/ready on 15021), Prometheus metrics (/metrics on 15020) and the
// localhost admin interface (15000: config dump, certificates, pprof).
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Options configure the servers. A nil listener disables its server.
type Options struct {
	Ready   net.Listener
	Metrics net.Listener
	Admin   net.Listener
	// IsReady reports readiness (discovery synced, certificate present, not
	// draining).
	IsReady  func() error
	Gatherer prometheus.Gatherer
	// Dumps are the /config_dump sections; each is called per request.
	Dumps  map[string]func() any
	Logger *zap.Logger
}

// Server is the set of operational HTTP servers.
type Server struct {
	opts Options
}

// New returns the servers; Run serves them.
func New(opts Options) *Server { return &Server{opts: opts} }

// ReadyHandler answers 200 when ready, 503 with the reason otherwise.
func (s *Server) ReadyHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := s.opts.IsReady(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
}

// AdminHandler serves the admin interface.
func (s *Server) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /config_dump", func(w http.ResponseWriter, r *http.Request) {
		out := map[string]json.RawMessage{}
		for name, f := range s.opts.Dumps {
			b, err := marshal(f())
			if err != nil {
				http.Error(w, fmt.Sprintf("%s: %v", name, err), http.StatusInternalServerError)
				return
			}
			out[name] = b
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(out)
	})
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	mux.Handle("GET /healthz/ready", s.ReadyHandler())
	return mux
}

// marshal encodes protobuf messages (and maps of them) with protojson.
func marshal(v any) (json.RawMessage, error) {
	switch m := v.(type) {
	case proto.Message:
		return protojson.Marshal(m)
	case map[string]proto.Message:
		out := map[string]json.RawMessage{}
		for k, pm := range m {
			b, err := protojson.Marshal(pm)
			if err != nil {
				return nil, err
			}
			out[k] = b
		}
		return json.Marshal(out)
	}
	return json.Marshal(v)
}

// Run serves until ctx is done, then shuts the servers down.
func (s *Server) Run(ctx context.Context) error {
	type srv struct {
		ln net.Listener
		h  http.Handler
	}
	metrics := http.NewServeMux()
	if s.opts.Gatherer != nil {
		metrics.Handle("GET /metrics", promhttp.HandlerFor(s.opts.Gatherer, promhttp.HandlerOpts{}))
	}
	ready := http.NewServeMux()
	ready.Handle("GET /healthz/ready", s.ReadyHandler())
	var servers []*http.Server
	var wg sync.WaitGroup
	errc := make(chan error, 3)
	for _, x := range []srv{{s.opts.Ready, ready}, {s.opts.Metrics, metrics}, {s.opts.Admin, s.AdminHandler()}} {
		if x.ln == nil {
			continue
		}
		hs := &http.Server{Handler: x.h, ReadHeaderTimeout: 5 * time.Second}
		if s.opts.Logger != nil {
			hs.ErrorLog = zap.NewStdLog(s.opts.Logger.Named("admin"))
		}
		servers = append(servers, hs)
		wg.Go(func() {
			if err := hs.Serve(x.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("serve %s: %w", x.ln.Addr(), err)
			}
		})
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	for _, hs := range servers {
		_ = hs.Shutdown(sctx)
	}
	wg.Wait()
	return err
}
