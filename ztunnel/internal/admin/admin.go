// Package admin serves ztunnel's operational HTTP endpoints: the admin
// interface on localhost:15000 (config dump as JSON, pprof), Prometheus
// metrics on :15020 and readiness on :15021 (DESIGN.md §3).
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
)

// Config configures the servers. An empty address disables that server.
type Config struct {
	AdminAddr   string // e.g. "127.0.0.1:15000"
	MetricsAddr string // e.g. ":15020"
	ReadyAddr   string // e.g. ":15021"
	// Dump returns the config dump; it is marshalled as JSON.
	Dump func() any
	// Gatherer provides the metrics.
	Gatherer prometheus.Gatherer
	// Ready returns nil once the proxy is ready to serve.
	Ready  func() error
	Logger *zap.Logger
}

// Server runs the three HTTP servers.
type Server struct {
	cfg Config

	mu  sync.Mutex
	lns map[string]net.Listener // "admin", "metrics", "ready"
}

// New returns a server for cfg.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &Server{cfg: cfg, lns: map[string]net.Listener{}}
}

// Listen binds the configured addresses. Run calls it when it was not
// called before.
func (s *Server) Listen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.lns) > 0 {
		return nil
	}
	for name, addr := range map[string]string{"admin": s.cfg.AdminAddr, "metrics": s.cfg.MetricsAddr, "ready": s.cfg.ReadyAddr} {
		if addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, l := range s.lns {
				l.Close()
			}
			s.lns = map[string]net.Listener{}
			return fmt.Errorf("admin: listen %s on %s: %w", name, addr, err)
		}
		s.lns[name] = ln
	}
	return nil
}

// Addr returns the bound address of "admin", "metrics" or "ready".
func (s *Server) Addr(name string) net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ln, ok := s.lns[name]; ok {
		return ln.Addr()
	}
	return nil
}

func (s *Server) handler(name string) http.Handler {
	mux := http.NewServeMux()
	switch name {
	case "admin":
		mux.HandleFunc("GET /config_dump", s.configDump)
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
		mux.HandleFunc("GET /healthz/ready", s.ready)
	case "metrics":
		g := s.cfg.Gatherer
		if g == nil {
			g = prometheus.NewRegistry()
		}
		mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	case "ready":
		mux.HandleFunc("GET /healthz/ready", s.ready)
	}
	return mux
}

func (s *Server) configDump(w http.ResponseWriter, _ *http.Request) {
	var v any = map[string]any{}
	if s.cfg.Dump != nil {
		v = s.cfg.Dump()
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
}

func (s *Server) ready(w http.ResponseWriter, _ *http.Request) {
	if s.cfg.Ready != nil {
		if err := s.cfg.Ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
	}
	_, _ = w.Write([]byte("ready\n"))
}

// Run serves until ctx is done, then shuts the servers down and returns.
func (s *Server) Run(ctx context.Context) error {
	if err := s.Listen(); err != nil {
		return err
	}
	s.mu.Lock()
	var srvs []*http.Server
	errc := make(chan error, len(s.lns))
	for name, ln := range s.lns {
		srv := &http.Server{Handler: s.handler(name), ReadHeaderTimeout: 10 * time.Second}
		srvs = append(srvs, srv)
		go func() {
			err := srv.Serve(ln)
			if errors.Is(err, http.ErrServerClosed) {
				err = nil
			}
			errc <- err
		}()
	}
	n := len(srvs)
	s.mu.Unlock()
	var first error
	select {
	case <-ctx.Done():
	case first = <-errc:
		n--
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	for _, srv := range srvs {
		_ = srv.Shutdown(sctx)
	}
	for ; n > 0; n-- {
		if err := <-errc; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return fmt.Errorf("admin: %w", first)
	}
	return nil
}
