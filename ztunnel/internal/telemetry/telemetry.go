// Package telemetry records ztunnel's per-connection telemetry: Istio's
// standard TCP metrics (istio_tcp_connections_opened_total, …_closed_total,
// istio_tcp_sent_bytes_total, istio_tcp_received_bytes_total) with Istio's
// label set, so that existing dashboards read them unchanged (DESIGN.md
// §5), and one structured access-log line per connection.
//
// As in Istio, "received" bytes flow from the client to the server (the
// request direction) and "sent" bytes from the server back to the client,
// whichever side reports.
package telemetry

import (
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Reporters.
const (
	ReporterSource      = "source"
	ReporterDestination = "destination"
)

// Response flags (Envoy's short codes).
const (
	FlagNone          = "-"
	FlagConnectFailed = "UF"   // upstream connection failure
	FlagNoHealthy     = "UH"   // no healthy upstream / unknown target
	FlagDenied        = "RBAC" // refused by authorization or mTLS mode
	FlagBadRequest    = "NR"   // no route: bad or foreign authority
)

// Security policies.
const (
	MutualTLS = "mutual_tls"
	None      = "none"
	Unknown   = "unknown"
)

// labelNames are Istio's standard TCP metric labels.
var labelNames = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal",
	"source_app", "source_version", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_app", "destination_version", "destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// Peer describes one end of a connection for telemetry.
type Peer struct {
	Workload  string // owning workload name (deployment…); "unknown" when empty
	Namespace string
	Principal string // spiffe://…; "unknown" when empty
	App       string // canonical service name
	Version   string // canonical revision
	Cluster   string
}

// Labels are the labels of one connection's metrics.
type Labels struct {
	Reporter    string
	Source      Peer
	Destination Peer
	// Service is the destination service hostname, its namespace and its
	// short name; all "unknown" when the connection was not to a service.
	ServiceHost, ServiceNamespace, ServiceName string
	Flags                                      string
	Security                                   string
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

func (l *Labels) values() []string {
	flags := l.Flags
	if flags == "" {
		flags = FlagNone
	}
	sec := l.Security
	if sec == "" {
		sec = Unknown
	}
	return []string{
		l.Reporter,
		orUnknown(l.Source.Workload), orUnknown(l.Source.Namespace), orUnknown(l.Source.Principal),
		orUnknown(l.Source.App), orUnknown(l.Source.Version), orUnknown(l.Source.Cluster),
		orUnknown(l.ServiceHost), orUnknown(l.ServiceNamespace), orUnknown(l.ServiceName),
		orUnknown(l.Destination.Workload), orUnknown(l.Destination.Namespace), orUnknown(l.Destination.Principal),
		orUnknown(l.Destination.App), orUnknown(l.Destination.Version), orUnknown(l.Destination.Cluster),
		"tcp", flags, sec,
	}
}

// Metrics holds the TCP metric families.
type Metrics struct {
	opened, closed *prometheus.CounterVec
	sent, received *prometheus.CounterVec
}

// NewMetrics registers the metric families with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_connections_opened_total", Help: "TCP connections opened.",
		}, labelNames),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_connections_closed_total", Help: "TCP connections closed.",
		}, labelNames),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_sent_bytes_total", Help: "Bytes sent from the server to the client.",
		}, labelNames),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_tcp_received_bytes_total", Help: "Bytes received from the client for the server.",
		}, labelNames),
	}
	reg.MustRegister(m.opened, m.closed, m.sent, m.received)
	return m
}

// Conn is the telemetry of one connection: counters resolved once when it
// opens, updated as it ends.
type Conn struct {
	opened, closed, sent, received prometheus.Counter
}

// Open counts an opened connection with labels l.
func (m *Metrics) Open(l *Labels) *Conn {
	v := l.values()
	c := &Conn{
		opened:   m.opened.WithLabelValues(v...),
		closed:   m.closed.WithLabelValues(v...),
		sent:     m.sent.WithLabelValues(v...),
		received: m.received.WithLabelValues(v...),
	}
	c.opened.Inc()
	return c
}

// Bytes adds transferred bytes: received flowed client→server, sent
// server→client.
func (c *Conn) Bytes(received, sent int64) {
	if received > 0 {
		c.received.Add(float64(received))
	}
	if sent > 0 {
		c.sent.Add(float64(sent))
	}
}

// Close counts the connection as closed.
func (c *Conn) Close() { c.closed.Inc() }

// Access is one access-log record.
type Access struct {
	Direction   string // "outbound" or "inbound"
	Listener    string // "15001", "15006", "15008"
	Source      netip.AddrPort
	SourceID    string // spiffe ID, if known
	SourcePod   string // namespace/name, if known
	Destination netip.AddrPort
	// Upstream is the address actually dialled (HBONE proxy or endpoint).
	Upstream      netip.AddrPort
	DestinationID string
	Service       string
	Workload      string // destination namespace/name, if known
	Protocol      string // "hbone", "passthrough", "plaintext"
	Waypoint      bool
	Received      int64 // client → server
	Sent          int64 // server → client
	Start         time.Time
	Flags         string
	Policy        string // deciding policy, if any
	Err           error
}

// Log writes the record as one line on the access logger.
func (a *Access) Log(l *zap.Logger) {
	fields := []zap.Field{
		zap.String("direction", a.Direction),
		zap.String("listener", a.Listener),
		zap.String("src.addr", a.Source.String()),
	}
	if a.Destination.IsValid() {
		fields = append(fields, zap.String("dst.addr", a.Destination.String()))
	}
	if a.Protocol != "" {
		fields = append(fields, zap.String("protocol", a.Protocol))
	}
	fields = append(fields,
		zap.Int64("bytes_received", a.Received),
		zap.Int64("bytes_sent", a.Sent),
		zap.Duration("duration", time.Since(a.Start)),
		zap.String("flags", orNone(a.Flags)),
	)
	if a.SourceID != "" {
		fields = append(fields, zap.String("src.identity", a.SourceID))
	}
	if a.SourcePod != "" {
		fields = append(fields, zap.String("src.workload", a.SourcePod))
	}
	if a.Upstream.IsValid() && a.Upstream != a.Destination {
		fields = append(fields, zap.String("dst.upstream", a.Upstream.String()))
	}
	if a.DestinationID != "" {
		fields = append(fields, zap.String("dst.identity", a.DestinationID))
	}
	if a.Service != "" {
		fields = append(fields, zap.String("dst.service", a.Service))
	}
	if a.Workload != "" {
		fields = append(fields, zap.String("dst.workload", a.Workload))
	}
	if a.Waypoint {
		fields = append(fields, zap.Bool("waypoint", true))
	}
	if a.Policy != "" {
		fields = append(fields, zap.String("policy", a.Policy))
	}
	if a.Err != nil {
		fields = append(fields, zap.String("error", a.Err.Error()))
	}
	l.Info("connection", fields...)
}

func orNone(s string) string {
	if s == "" {
		return FlagNone
	}
	return s
}
