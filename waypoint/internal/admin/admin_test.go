package admin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
)

func listen(t *testing.T) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func TestServers(t *testing.T) {
	var notReady atomic.Value
	notReady.Store("discovery not synced")
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "istio_requests_total", Help: "x"})
	reg.MustRegister(c)
	c.Add(3)
	ready, metrics, adm := listen(t), listen(t), listen(t)
	s := New(Options{Ready: ready, Metrics: metrics, Admin: adm, Gatherer: reg,
		IsReady: func() error {
			if v := notReady.Load().(string); v != "" {
				return errors.New(v)
			}
			return nil
		},
		Dumps: map[string]func() any{
			"waypoint_services": func() any {
				return map[string]proto.Message{"default/a": &discoveryv1.WaypointService{Service: "default/a", Gateway: "default/wp"}}
			},
			"catalog": func() any { return map[string]int{"generation": 7} },
		}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	get := func(addr, path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get(ready.Addr().String(), "/healthz/ready"); code != 503 || !strings.Contains(body, "discovery not synced") {
		t.Fatalf("not ready: %d %q", code, body)
	}
	notReady.Store("")
	if code, _ := get(ready.Addr().String(), "/healthz/ready"); code != 200 {
		t.Fatalf("ready: %d", code)
	}
	if code, body := get(metrics.Addr().String(), "/metrics"); code != 200 || !strings.Contains(body, "istio_requests_total 3") {
		t.Fatalf("metrics: %d %q", code, body)
	}
	code, body := get(adm.Addr().String(), "/config_dump")
	if code != 200 {
		t.Fatalf("config dump: %d", code)
	}
	var dump map[string]map[string]any
	if err := json.Unmarshal([]byte(body), &dump); err != nil {
		t.Fatalf("config dump is not JSON: %v\n%s", err, body)
	}
	if ws := dump["waypoint_services"]["default/a"].(map[string]any); ws["gateway"] != "default/wp" {
		t.Fatalf("protojson dump: %v", dump)
	}
	if dump["catalog"]["generation"].(float64) != 7 {
		t.Fatalf("json dump: %v", dump)
	}
	if code, _ := get(adm.Addr().String(), "/debug/pprof/"); code != 200 {
		t.Fatalf("pprof: %d", code)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	if _, err := http.Get("http://" + ready.Addr().String() + "/healthz/ready"); err == nil {
		t.Fatal("still serving after Run returned")
	}
}
