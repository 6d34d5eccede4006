package xds

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// metrics of a Server. Names follow the Prometheus conventions under the
// amesh_xds_ prefix; "type" is the resource's full message name.
type metrics struct {
	pushes  *prometheus.CounterVec
	latency *prometheus.HistogramVec
	clients prometheus.Gauge
	nacks   *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, log *zap.Logger) *metrics {
	m := &metrics{
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "amesh_xds_pushes_total",
			Help: "Delta discovery responses sent, by resource type.",
		}, []string{"type"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "amesh_xds_push_latency_seconds",
			Help:    "Time from a resource change (Set/Update) to the response carrying it being sent.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"type"}),
		clients: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "amesh_xds_connected_clients",
			Help: "Authenticated delta discovery streams.",
		}),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "amesh_xds_nacks_total",
			Help: "Responses rejected by clients, by resource type.",
		}, []string{"type"}),
	}
	if reg == nil {
		return m
	}
	m.pushes = register(reg, log, m.pushes)
	m.latency = register(reg, log, m.latency)
	m.clients = register(reg, log, m.clients)
	m.nacks = register(reg, log, m.nacks)
	return m
}

// register registers c, or returns the identical collector registered
// before (a second Server on one registry shares the metrics).
func register[C prometheus.Collector](reg prometheus.Registerer, log *zap.Logger, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		log.Error("xds: cannot register metric", zap.Error(err))
	}
	return c
}
