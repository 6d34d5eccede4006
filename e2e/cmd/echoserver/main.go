// Command echoserver is an HTTP echo app for the end-to-end tests: it
// answers every request with a JSON description of the request and of the
// pod serving it (name, namespace, IP, node — from the Downward API
// environment), serves /healthz and /readyz, and drains gracefully on
// SIGTERM, logging how it stopped.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

// Response is what the server answers.
type Response struct {
	Pod       string              `json:"pod"`
	Namespace string              `json:"namespace"`
	PodIP     string              `json:"podIP"`
	Node      string              `json:"node"`
	Hostname  string              `json:"hostname"`
	Method    string              `json:"method"`
	Path      string              `json:"path"`
	Host      string              `json:"host"`
	Proto     string              `json:"proto"`
	Remote    string              `json:"remote"`
	Headers   map[string][]string `json:"headers"`
}

func main() {
	addr := flag.String("listen", ":8080", "listen address")
	drain := flag.Duration("drain", 2*time.Second, "how long to keep serving after SIGTERM before shutting down")
	flag.Parse()
	log := slog.New(slog.NewJSONHandler(os.Stdout, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, log, *addr, *drain); err != nil {
		log.Error("echoserver failed", "err", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, log *slog.Logger, addr string, drain time.Duration) error {
	host, _ := os.Hostname()
	base := Response{
		Pod: os.Getenv("POD_NAME"), Namespace: os.Getenv("POD_NAMESPACE"),
		PodIP: os.Getenv("POD_IP"), Node: os.Getenv("NODE_NAME"), Hostname: host,
	}
	var ready atomic.Bool
	ready.Store(true)
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		resp := base
		resp.Method, resp.Path, resp.Host, resp.Proto = r.Method, r.URL.RequestURI(), r.Host, r.Proto
		resp.Remote, resp.Headers = r.RemoteAddr, r.Header
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(resp)
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	log.Info("serving", "addr", ln.Addr().String(), "pod", base.Pod, "node", base.Node)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	start := time.Now()
	log.Info("received SIGTERM; draining", "drain", drain.String())
	ready.Store(false)
	time.Sleep(drain)
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return err
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	log.Info("stopped gracefully", "after", time.Since(start).String())
	return nil
}
