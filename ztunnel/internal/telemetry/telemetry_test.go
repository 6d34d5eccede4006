package telemetry

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestMetrics(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	m := NewMetrics(reg)
	l := &Labels{
		Reporter:    ReporterSource,
		Source:      Peer{Workload: "sleep", Namespace: "foo", Principal: "spiffe://cluster.local/ns/foo/sa/sleep", App: "sleep", Version: "v1"},
		Destination: Peer{Workload: "echo", Namespace: "bar"},
		ServiceHost: "echo.bar.svc.cluster.local", ServiceNamespace: "bar", ServiceName: "echo",
		Security: MutualTLS,
	}
	c := m.Open(l)
	c.Bytes(100, 250)
	c.Bytes(1, 0)
	c.Close()
	m.Open(&Labels{Reporter: ReporterDestination, Flags: FlagDenied}).Close()

	want := `
# HELP istio_tcp_received_bytes_total Bytes received from the client for the server.
# TYPE istio_tcp_received_bytes_total counter
istio_tcp_received_bytes_total{connection_security_policy="mutual_tls",destination_app="unknown",destination_cluster="unknown",destination_principal="unknown",destination_service="echo.bar.svc.cluster.local",destination_service_name="echo",destination_service_namespace="bar",destination_version="unknown",destination_workload="echo",destination_workload_namespace="bar",reporter="source",request_protocol="tcp",response_flags="-",source_app="sleep",source_cluster="unknown",source_principal="spiffe://cluster.local/ns/foo/sa/sleep",source_version="v1",source_workload="sleep",source_workload_namespace="foo"} 101
istio_tcp_received_bytes_total{connection_security_policy="unknown",destination_app="unknown",destination_cluster="unknown",destination_principal="unknown",destination_service="unknown",destination_service_name="unknown",destination_service_namespace="unknown",destination_version="unknown",destination_workload="unknown",destination_workload_namespace="unknown",reporter="destination",request_protocol="tcp",response_flags="RBAC",source_app="unknown",source_cluster="unknown",source_principal="unknown",source_version="unknown",source_workload="unknown",source_workload_namespace="unknown"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "istio_tcp_received_bytes_total"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(m.opened); n != 2 {
		t.Fatalf("opened series = %d, want 2", n)
	}
	if v := testutil.ToFloat64(m.sent.WithLabelValues(l.values()...)); v != 250 {
		t.Fatalf("sent = %v", v)
	}
	if v := testutil.ToFloat64(m.closed.WithLabelValues((&Labels{Reporter: ReporterDestination, Flags: FlagDenied}).values()...)); v != 1 {
		t.Fatalf("closed denied = %v", v)
	}
}

func TestAccessLog(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	a := &Access{
		Direction: "outbound", Listener: "15001",
		Source:      netip.MustParseAddrPort("10.0.0.1:5555"),
		Destination: netip.MustParseAddrPort("10.96.0.1:80"),
		Upstream:    netip.MustParseAddrPort("10.0.0.2:15008"),
		SourceID:    "spiffe://cluster.local/ns/foo/sa/sleep", Protocol: "hbone",
		Received: 10, Sent: 20, Start: time.Now(), Err: errors.New("boom"),
	}
	a.Log(zap.New(core))
	if logs.Len() != 1 {
		t.Fatalf("%d lines, want 1", logs.Len())
	}
	f := logs.All()[0].ContextMap()
	for k, v := range map[string]any{
		"src.addr": "10.0.0.1:5555", "dst.addr": "10.96.0.1:80", "dst.upstream": "10.0.0.2:15008",
		"bytes_received": int64(10), "bytes_sent": int64(20), "flags": "-", "error": "boom",
		"src.identity": "spiffe://cluster.local/ns/foo/sa/sleep", "direction": "outbound",
	} {
		if f[k] != v {
			t.Errorf("%s = %v, want %v", k, f[k], v)
		}
	}
}
