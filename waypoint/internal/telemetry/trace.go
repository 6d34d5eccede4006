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
	prop   propagation.TextMapPropagator
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
		prop: propagation.NewCompositeTextMapPropagator(
			propagation.TraceContext{},
			b3.New(b3.WithInjectEncoding(b3.B3MultipleHeader)),
		),
	}, nil
}

// Shutdown flushes and stops the exporter.
func (t *Tracer) Shutdown(ctx context.Context) error { return t.tp.Shutdown(ctx) }

// Start extracts the incoming trace context from h, starts the waypoint's
// span and returns the context carrying it.
func (t *Tracer) Start(ctx context.Context, name string, h http.Header) (context.Context, trace.Span) {
	ctx = t.prop.Extract(ctx, propagation.HeaderCarrier(h))
	return t.tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindServer))
}

// Inject writes the trace context of ctx into the outgoing headers h,
// replacing any incoming values (the waypoint span becomes the parent).
func (t *Tracer) Inject(ctx context.Context, h http.Header) {
	for _, k := range []string{"Traceparent", "Tracestate", "B3", "X-B3-Traceid", "X-B3-Spanid", "X-B3-Parentspanid", "X-B3-Sampled", "X-B3-Flags"} {
		delete(h, k)
	}
	t.prop.Inject(ctx, propagation.HeaderCarrier(h))
}

// End finishes span with the response code.
func End(span trace.Span, code int, flags string, end time.Time) {
	span.SetAttributes(attribute.Int("http.response.status_code", code), attribute.String("response_flags", flags))
	span.End(trace.WithTimestamp(end))
}
