package mesh

import (
	"strings"
	"testing"
)

func TestParseAccessLogs(t *testing.T) {
	logs := strings.Join([]string{
		`{"level":"info","ts":1795622344.5,"caller":"app/app.go:168","msg":"ztunnel started"}`,
		`{"level":"info","ts":1795622395.011583,"logger":"access","msg":"connection","direction":"outbound","listener":"15001","src.addr":"10.177.1.5:49190","dst.addr":"10.97.200.4:9080","protocol":"hbone","flags":"-","src.identity":"spiffe://cluster.local/ns/bookinfo/sa/client","src.workload":"bookinfo/client-5f","dst.upstream":"10.177.2.5:15008","dst.identity":"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage","dst.service":"productpage.bookinfo.svc.cluster.local","dst.workload":"bookinfo/productpage-v1-76"}`,
		`not json "logger":"access"`,
		`{"level":"info","ts":1795622455.07,"logger":"access","msg":"connection","direction":"inbound","listener":"15008","protocol":"hbone","src.identity":"spiffe://cluster.local/ns/a/sa/x","dst.identity":"spiffe://cluster.local/ns/a/sa/y"}`,
	}, "\n")
	got := ParseAccessLogs(logs)
	if len(got) != 2 {
		t.Fatalf("%d records, want 2: %+v", len(got), got)
	}
	a := got[0]
	if a.Direction != "outbound" || a.Protocol != "hbone" || a.SrcIdentity != Identity("bookinfo", "client") ||
		a.DstIdentity != Identity("bookinfo", "bookinfo-productpage") || a.DstUpstream != "10.177.2.5:15008" ||
		a.DstService != "productpage.bookinfo.svc.cluster.local" || a.Time.Unix() != 1795622395 {
		t.Errorf("first record %+v", a)
	}
	if got[1].Direction != "inbound" || got[1].DstIdentity != Identity("a", "y") {
		t.Errorf("second record %+v", got[1])
	}
}

func TestMetrics(t *testing.T) {
	m, err := ParseMetrics([]byte(`# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source",source_principal="a",destination_principal="b"} 3
istio_tcp_connections_opened_total{reporter="destination",source_principal="a",destination_principal="b"} 2
istio_tcp_connections_opened_total{reporter="source",source_principal="c",destination_principal="b"} 7
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{le="+Inf"} 4
istio_request_duration_milliseconds_sum 10
istio_request_duration_milliseconds_count 4
`))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		match map[string]string
		want  float64
	}{
		{"istio_tcp_connections_opened_total", nil, 12},
		{"istio_tcp_connections_opened_total", map[string]string{"reporter": "source"}, 10},
		{"istio_tcp_connections_opened_total", map[string]string{"reporter": "source", "source_principal": "a"}, 3},
		{"istio_tcp_connections_opened_total", map[string]string{"reporter": "nobody"}, 0},
		{"istio_request_duration_milliseconds", nil, 4},
		{"absent", nil, 0},
	}
	for _, tc := range tests {
		if got := m.Sum(tc.name, tc.match); got != tc.want {
			t.Errorf("Sum(%s, %v) = %v, want %v", tc.name, tc.match, got, tc.want)
		}
	}
	if _, err := ParseMetrics([]byte("garbage{")); err == nil {
		t.Error("garbage parsed")
	}
}

func TestRouteAccepted(t *testing.T) {
	parent := func(status string, gen int64) map[string]any {
		return map[string]any{"parentRef": map[string]any{"name": "reviews"}, "conditions": []any{
			map[string]any{"type": "ResolvedRefs", "status": "True", "observedGeneration": gen},
			map[string]any{"type": "Accepted", "status": status, "observedGeneration": gen, "reason": "R", "message": "m"},
		}}
	}
	route := func(parents ...any) map[string]any {
		return map[string]any{"status": map[string]any{"parents": parents}}
	}
	tests := []struct {
		name string
		obj  map[string]any
		gen  int64
		want bool
	}{
		{"accepted", route(parent("True", 2)), 2, true},
		{"two parents", route(parent("True", 2), parent("True", 3)), 2, true},
		{"one refused", route(parent("True", 2), parent("False", 2)), 2, false},
		{"stale generation", route(parent("True", 1)), 2, false},
		{"no status", map[string]any{}, 1, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ok, err := RouteAccepted(tc.obj, tc.gen)
			if ok != tc.want || (err == nil) != tc.want {
				t.Errorf("RouteAccepted = %t, %v; want %t", ok, err, tc.want)
			}
		})
	}
}

func TestWorkloadObjects(t *testing.T) {
	objs, err := Workload{Name: "server-v2", App: "server", Version: "v2", Service: true, VersionService: true,
		Env: map[string]string{"B": "2", "A": "1"}}.Objects("ns1")
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, o := range objs {
		kinds = append(kinds, o.GetKind()+"/"+o.GetName())
		if o.GetNamespace() != "ns1" {
			t.Errorf("%s/%s in namespace %q", o.GetKind(), o.GetName(), o.GetNamespace())
		}
	}
	if got := strings.Join(kinds, " "); got != "ServiceAccount/server-v2 Deployment/server-v2 Service/server Service/server-v2" {
		t.Errorf("objects %s", got)
	}
	if sel := (Workload{Name: "x"}).Selector(); sel != "app=x,version=v1" {
		t.Errorf("selector %q", sel)
	}
	for _, s := range []string{"", "local", "kind"} {
		if _, err := ParseEnv(s); err != nil {
			t.Errorf("ParseEnv(%q): %v", s, err)
		}
	}
	if _, err := ParseEnv("gke"); err == nil {
		t.Error("ParseEnv accepted gke")
	}
}
