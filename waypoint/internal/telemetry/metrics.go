// Package telemetry holds the waypoint's Istio-standard HTTP and TCP metrics
// (reporter="waypoint"), its access-log record and trace-context propagation.
package telemetry

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Labels are the standard Istio metric labels of one request or connection.
type Labels struct {
	SourceWorkload, SourceWorkloadNamespace, SourcePrincipal, SourceApp, SourceVersion string
	SourceCanonicalService, SourceCanonicalRevision, SourceCluster                     string
	DestinationWorkload, DestinationWorkloadNamespace, DestinationPrincipal            string
	DestinationApp, DestinationVersion, DestinationService, DestinationServiceName     string
	DestinationServiceNamespace, DestinationCanonicalService                           string
	DestinationCanonicalRevision, DestinationCluster                                   string
	RequestProtocol, ResponseCode, GRPCResponseStatus, ResponseFlags                   string
	ConnectionSecurityPolicy                                                           string
}

var httpLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
	"source_canonical_service", "source_canonical_revision", "source_cluster",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_app", "destination_version", "destination_service", "destination_service_name",
	"destination_service_namespace", "destination_canonical_service", "destination_canonical_revision",
	"destination_cluster",
	"request_protocol", "response_code", "grpc_response_status", "response_flags",
	"connection_security_policy",
}

func (l *Labels) values() []string {
	u := func(s string) string {
		if s == "" {
			return "unknown"
		}
		return s
	}
	return []string{
		"waypoint",
		u(l.SourceWorkload), u(l.SourceWorkloadNamespace), u(l.SourcePrincipal), u(l.SourceApp), u(l.SourceVersion),
		u(l.SourceCanonicalService), u(l.SourceCanonicalRevision), u(l.SourceCluster),
		u(l.DestinationWorkload), u(l.DestinationWorkloadNamespace), u(l.DestinationPrincipal),
		u(l.DestinationApp), u(l.DestinationVersion), u(l.DestinationService), u(l.DestinationServiceName),
		u(l.DestinationServiceNamespace), u(l.DestinationCanonicalService), u(l.DestinationCanonicalRevision),
		u(l.DestinationCluster),
		l.RequestProtocol, l.ResponseCode, l.GRPCResponseStatus, l.ResponseFlags,
		u(l.ConnectionSecurityPolicy),
	}
}

// Metrics are the waypoint's Prometheus collectors.
type Metrics struct {
	requests      *prometheus.CounterVec
	duration      *prometheus.HistogramVec
	requestBytes  *prometheus.HistogramVec
	responseBytes *prometheus.HistogramVec
	tcpOpened     *prometheus.CounterVec
	tcpClosed     *prometheus.CounterVec
	tcpSent       *prometheus.CounterVec
	tcpReceived   *prometheus.CounterVec

	// series caches the children per label set: resolving 25 label values
	// for 4 vectors on every request costs more than the rest of the
	// bookkeeping. Label sets are few (source × destination × code). A map
	// keyed by the struct itself (not sync.Map, whose interface keys would
	// copy the 400-byte Labels to the heap on every lookup).
	mu     sync.RWMutex
	series map[Labels]*httpSeries
}

type httpSeries struct {
	requests                          prometheus.Counter
	duration, requestBytes, respBytes prometheus.Observer
}

// maxSeries bounds the cache; beyond it children are resolved per request.
const maxSeries = 10000

// Istio's default buckets.
var (
	durationBuckets = []float64{0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000}
	bytesBuckets    = []float64{1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000}
)

// NewMetrics registers the collectors on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	tcpLabels := tcpLabelNames()
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_requests_total",
			Help: "Requests handled by the waypoint."}, httpLabels),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_duration_milliseconds",
			Help: "Request duration in milliseconds.", Buckets: durationBuckets}, httpLabels),
		requestBytes: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_bytes",
			Help: "Request sizes (headers and body) in bytes.", Buckets: bytesBuckets}, httpLabels),
		responseBytes: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_response_bytes",
			Help: "Response sizes (headers and body) in bytes.", Buckets: bytesBuckets}, httpLabels),
		tcpOpened: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total",
			Help: "TCP connections opened through the waypoint (L4 passthrough)."}, tcpLabels),
		tcpClosed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_closed_total",
			Help: "TCP connections closed through the waypoint (L4 passthrough)."}, tcpLabels),
		tcpSent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_sent_bytes_total",
			Help: "Bytes sent to the client (L4 passthrough)."}, tcpLabels),
		tcpReceived: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_received_bytes_total",
			Help: "Bytes received from the client (L4 passthrough)."}, tcpLabels),
		series: map[Labels]*httpSeries{},
	}
	reg.MustRegister(m.requests, m.duration, m.requestBytes, m.responseBytes, m.tcpOpened, m.tcpClosed, m.tcpSent, m.tcpReceived)
	return m
}

// Request records one finished request.
func (m *Metrics) Request(l *Labels, durationMS float64, reqBytes, respBytes int64) {
	m.mu.RLock()
	s := m.series[*l]
	m.mu.RUnlock()
	if s == nil {
		v := l.values()
		s = &httpSeries{requests: m.requests.WithLabelValues(v...), duration: m.duration.WithLabelValues(v...),
			requestBytes: m.requestBytes.WithLabelValues(v...), respBytes: m.responseBytes.WithLabelValues(v...)}
		m.mu.Lock()
		if len(m.series) < maxSeries {
			m.series[*l] = s
		}
		m.mu.Unlock()
	}
	s.requests.Inc()
	s.duration.Observe(durationMS)
	s.requestBytes.Observe(float64(reqBytes))
	s.respBytes.Observe(float64(respBytes))
}

// TCP metrics carry the HTTP labels minus response_code and
// grpc_response_status, as Istio's do.
func tcpLabelNames() []string {
	var out []string
	for _, n := range httpLabels {
		if n != "response_code" && n != "grpc_response_status" {
			out = append(out, n)
		}
	}
	return out
}

func (l *Labels) tcpValues() []string {
	v := l.values()
	out := make([]string, 0, len(v)-2)
	for i, n := range httpLabels {
		if n != "response_code" && n != "grpc_response_status" {
			out = append(out, v[i])
		}
	}
	return out
}

// TCPOpen records an L4 connection opening.
func (m *Metrics) TCPOpen(l *Labels) { m.tcpOpened.WithLabelValues(l.tcpValues()...).Inc() }

// TCPClose records an L4 connection closing with its byte counts.
func (m *Metrics) TCPClose(l *Labels, sent, received int64) {
	v := l.tcpValues()
	m.tcpClosed.WithLabelValues(v...).Inc()
	m.tcpSent.WithLabelValues(v...).Add(float64(sent))
	m.tcpReceived.WithLabelValues(v...).Add(float64(received))
}

// RequestsCounter exposes istio_requests_total (tests and admin).
func (m *Metrics) RequestsCounter() *prometheus.CounterVec { return m.requests }
