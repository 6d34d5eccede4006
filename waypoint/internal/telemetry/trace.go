package telemetry

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"go.opentelemetry.io/contrib/propagators/b3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// TracingConfig configures tracing.
type TracingConfig struct {
	// OTLPEndpoint is host:port of an OTLP/gRPC collector; empty disables
	// export (trace context is still propagated, with a new span ID for the
	// waypoint hop).
	OTLPEndpoint string
	// Insecure disables TLS to the collector.
	Insecure bool
	// SampleRatio for traces that arrive without a sampling decision (0–1).
	SampleRatio float64
	// ServiceName is the resource service.name, e.g. "waypoint.<ns>".
	ServiceName string
}

// Tracer propagates W3C traceparent/tracestate and B3 (single and multi
// header) and records one server span per request.
type Tracer struct {
	tp     *sdktrace.TracerProvider
	tracer trace.Tracer
	w3c    propagation.TraceContext
	b3     propagation.TextMapPropagator
	kind   trace.SpanStartOption // immutable, built once
}

// NewTracer builds the tracer; Shutdown flushes it.
func NewTracer(ctx context.Context, cfg TracingConfig) (*Tracer, error) {
	opts := []sdktrace.TracerProviderOption{
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(cfg.SampleRatio))),
	}
	res, err := resource.New(ctx, resource.WithAttributes(attribute.String("service.name", cfg.ServiceName)))
	if err != nil {
		return nil, fmt.Errorf("trace resource: %w", err)
	}
	opts = append(opts, sdktrace.WithResource(res))
	if cfg.OTLPEndpoint != "" {
		eopts := []otlptracegrpc.Option{otlptracegrpc.WithEndpoint(cfg.OTLPEndpoint)}
		if cfg.Insecure {
			eopts = append(eopts, otlptracegrpc.WithInsecure())
		}
		exp, err := otlptracegrpc.New(ctx, eopts...)
		if err != nil {
			return nil, fmt.Errorf("otlp exporter: %w", err)
		}
		opts = append(opts, sdktrace.WithBatcher(exp))
	}
	tp := sdktrace.NewTracerProvider(opts...)
	return &Tracer{
		tp:     tp,
		tracer: tp.Tracer("amesh.dev/waypoint"),
		b3:     b3.New(b3.WithInjectEncoding(b3.B3MultipleHeader)),
		kind:   trace.WithSpanKind(trace.SpanKindServer),
	}, nil
}

// Shutdown flushes and stops the exporter.
func (t *Tracer) Shutdown(ctx context.Context) error { return t.tp.Shutdown(ctx) }

// Start extracts the incoming trace context from h (W3C, then B3, which
// wins when both are present), starts the waypoint's span and returns the
// context carrying it.
func (t *Tracer) Start(ctx context.Context, name string, h http.Header) (context.Context, trace.Span) {
	ctx = t.w3c.Extract(ctx, carrier(h))
	if hasB3(h) {
		// Only then: B3 extraction of nothing still costs context values,
		// and would have the waypoint defer the sampling decision it has
		// made (X-B3-Sampled is then sent).
		ctx = t.b3.Extract(ctx, carrier(h))
	}
	return t.tracer.Start(ctx, name, t.kind)
}

func hasB3(h http.Header) bool {
	_, single := h["B3"]
	_, multi := h["X-B3-Traceid"]
	return single || multi
}

// Inject writes the trace context of ctx into the outgoing headers h,
// replacing any incoming values (the waypoint span becomes the parent).
func (t *Tracer) Inject(ctx context.Context, h http.Header) {
	for _, k := range []string{"Traceparent", "Tracestate", "B3", "X-B3-Traceid", "X-B3-Spanid", "X-B3-Parentspanid", "X-B3-Sampled", "X-B3-Flags"} {
		delete(h, k)
	}
	c := &injector{h: h}
	t.w3c.Inject(ctx, c)
	t.b3.Inject(ctx, c)
}

// injector is the carrier for Inject: the injected headers' value slices
// share one array (traceparent, tracestate and three B3 headers).
type injector struct {
	h   http.Header
	buf [6]string
	n   int
}

func (c *injector) Get(k string) string { return carrier(c.h).Get(k) }

func (c *injector) Set(k, v string) {
	if c.n == len(c.buf) {
		carrier(c.h).Set(k, v)
		return
	}
	c.buf[c.n] = v
	c.h[canonical(k)] = c.buf[c.n : c.n+1 : c.n+1]
	c.n++
}

func (c *injector) Keys() []string { return carrier(c.h).Keys() }

// End finishes span with the response code. An unsampled span records
// nothing, so nothing is built for it.
func End(span trace.Span, code int, flags string, end time.Time) {
	if !span.IsRecording() {
		return
	}
	span.SetAttributes(attribute.Int("http.response.status_code", code), attribute.String("response_flags", flags))
	span.End(trace.WithTimestamp(end))
}

// carrier adapts http.Header to the propagators, which name headers in
// lower case: the names they use are mapped to their canonical form
// without the allocation that canonicalizing costs (propagation.HeaderCarrier
// canonicalizes on every Get and Set, a dozen times per request).
type carrier http.Header

func canonical(k string) string {
	switch k {
	case "traceparent":
		return "Traceparent"
	case "tracestate":
		return "Tracestate"
	case "baggage":
		return "Baggage"
	case "b3":
		return "B3"
	case "x-b3-traceid":
		return "X-B3-Traceid"
	case "x-b3-spanid":
		return "X-B3-Spanid"
	case "x-b3-parentspanid":
		return "X-B3-Parentspanid"
	case "x-b3-sampled":
		return "X-B3-Sampled"
	case "x-b3-flags":
		return "X-B3-Flags"
	}
	return http.CanonicalHeaderKey(k)
}

func (c carrier) Get(k string) string {
	if v := c[canonical(k)]; len(v) > 0 {
		return v[0]
	}
	return ""
}

func (c carrier) Set(k, v string) { c[canonical(k)] = []string{v} }

func (c carrier) Keys() []string { return propagation.HeaderCarrier(c).Keys() }
