package admin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestServer(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total", Help: "x"})
	reg.MustRegister(c)
	c.Add(3)
	var ready atomic.Bool
	s := New(Config{
		AdminAddr: "127.0.0.1:0", MetricsAddr: "127.0.0.1:0", ReadyAddr: "127.0.0.1:0",
		Dump:     func() any { return map[string]any{"workloads": []string{"a"}} },
		Gatherer: reg,
		Ready: func() error {
			if !ready.Load() {
				return errors.New("discovery not synced")
			}
			return nil
		},
	})
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()

	code, body := get(t, "http://"+s.Addr("admin").String()+"/config_dump")
	var d map[string][]string
	if code != 200 || json.Unmarshal([]byte(body), &d) != nil || d["workloads"][0] != "a" {
		t.Fatalf("config_dump: %d %s", code, body)
	}
	code, body = get(t, "http://"+s.Addr("metrics").String()+"/metrics")
	if code != 200 || !strings.Contains(body, "istio_tcp_connections_opened_total 3") {
		t.Fatalf("metrics: %d %s", code, body)
	}
	readyURL := "http://" + s.Addr("ready").String() + "/healthz/ready"
	if code, body = get(t, readyURL); code != 503 || !strings.Contains(body, "discovery not synced") {
		t.Fatalf("ready before: %d %s", code, body)
	}
	ready.Store(true)
	if code, _ = get(t, readyURL); code != 200 {
		t.Fatalf("ready after: %d", code)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := http.Get(readyURL); err == nil {
		t.Fatal("server still answers after Run returned")
	}
}

func TestListenConflict(t *testing.T) {
	a := New(Config{AdminAddr: "127.0.0.1:0"})
	if err := a.Listen(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_ = a.Run(ctx)
	}()
	b := New(Config{MetricsAddr: a.Addr("admin").String()})
	if err := b.Listen(); err == nil {
		t.Fatal("second bind of the same address succeeded")
	}
}
