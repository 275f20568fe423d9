// Package oteltrace sets up OpenTelemetry tracing for Stowage's processes:
// a tracer provider that exports spans by OTLP/HTTP when an endpoint is
// configured (and exports nothing otherwise, while trace ids still flow
// across processes and into logs and job records), the W3C trace-context
// propagator, the Connect interceptor (connectrpc.com/otelconnect) that
// makes a span per RPC on both sides, and a slog handler that writes the
// trace and span ids into every log line emitted in a traced context.
package oteltrace

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"sync"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/otelconnect"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/stowage/stowage/errdefs"
)

// Config is how a process traces.
type Config struct {
	// Endpoint is the OTLP/HTTP collector's base URL, e.g.
	// https://collector:4318 (spans go to /v1/traces). Empty: nothing is
	// exported. Plain http:// is accepted for a loopback collector only.
	Endpoint string
	// CAFile, when set, is the PEM bundle the collector's certificate is
	// checked against (else the system's roots).
	CAFile string
	// Service is the service.name resource attribute (stowage-controller,
	// stowage-agent); Instance is service.instance.id (the host id).
	Service  string
	Instance string
}

// Tracing is a process's tracer provider.
type Tracing struct {
	provider *sdktrace.TracerProvider
}

var (
	mu        sync.Mutex
	installed *Tracing
)

// Setup installs the global tracer provider and propagator for cfg. A
// process sets up once: a second call (`stowage dev` runs the controller
// and an agent in one process) returns the first's.
func Setup(ctx context.Context, cfg Config) (*Tracing, error) {
	mu.Lock()
	defer mu.Unlock()
	if installed != nil {
		return installed, nil
	}
	attrs := []attribute.KeyValue{semconv.ServiceName(cfg.Service)}
	if cfg.Instance != "" {
		attrs = append(attrs, semconv.ServiceInstanceID(cfg.Instance))
	}
	if h, err := os.Hostname(); err == nil {
		attrs = append(attrs, semconv.HostName(h))
	}
	opts := []sdktrace.TracerProviderOption{
		sdktrace.WithResource(resource.NewSchemaless(attrs...)),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.AlwaysSample())),
	}
	if cfg.Endpoint != "" {
		exp, err := exporter(ctx, cfg)
		if err != nil {
			return nil, err
		}
		opts = append(opts, sdktrace.WithBatcher(exp, sdktrace.WithBatchTimeout(time.Second)))
	}
	tp := sdktrace.NewTracerProvider(opts...)
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	installed = &Tracing{provider: tp}
	return installed, nil
}

// exporter is the OTLP/HTTP exporter for cfg.Endpoint.
func exporter(ctx context.Context, cfg Config) (sdktrace.SpanExporter, error) {
	u, err := url.Parse(cfg.Endpoint)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return nil, fmt.Errorf("--otlp-endpoint %q: want https://host:port (or http:// to a loopback collector): %w", cfg.Endpoint, errdefs.ErrInvalid)
	}
	opts := []otlptracehttp.Option{otlptracehttp.WithEndpointURL(u.JoinPath("v1", "traces").String())}
	if u.Scheme == "http" {
		if ip := net.ParseIP(u.Hostname()); u.Hostname() != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return nil, fmt.Errorf("--otlp-endpoint %s: plain http is accepted for a loopback collector only; use https: %w", cfg.Endpoint, errdefs.ErrInvalid)
		}
		opts = append(opts, otlptracehttp.WithInsecure())
	} else if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("--otlp-ca-file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--otlp-ca-file %s: no PEM certificate in it: %w", cfg.CAFile, errdefs.ErrInvalid)
		}
		opts = append(opts, otlptracehttp.WithTLSClientConfig(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}))
	}
	exp, err := otlptracehttp.New(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("OTLP exporter for %s: %w", cfg.Endpoint, err)
	}
	return exp, nil
}

// Shutdown flushes the spans not exported yet and stops the provider.
func (t *Tracing) Shutdown(ctx context.Context) error {
	if t == nil {
		return nil
	}
	if err := t.provider.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("flush traces: %w", err)
	}
	return nil
}

// Interceptor makes a span per Connect call, client or server side, and
// carries the trace context across (W3C traceparent). A server continues
// the caller's trace: the controller is called by orchestrators that pass
// theirs, the agents by the controller.
func (t *Tracing) Interceptor() (connect.Interceptor, error) {
	i, err := otelconnect.NewInterceptor(otelconnect.WithTracerProvider(t.provider), otelconnect.WithPropagator(propagation.TraceContext{}),
		otelconnect.WithTrustRemote(), otelconnect.WithoutMetrics(), otelconnect.WithFilter(traced))
	if err != nil {
		return nil, fmt.Errorf("otelconnect: %w", err)
	}
	return i, nil
}

// untraced are the calls too frequent and too routine to trace: every
// agent's heartbeat (1,000 hosts beat 100 times a second) and the agents'
// progress polls of running tasks.
var untraced = map[string]bool{
	"/stowage.v1.AgentControlService/Heartbeat": true,
	"/stowage.v1.AgentService/GetTask":          true,
}

// traced reports whether the call of spec gets a span.
func traced(_ context.Context, spec connect.Spec) bool { return !untraced[spec.Procedure] }

// Tracer is Stowage's tracer from the global provider.
func Tracer() trace.Tracer { return otel.Tracer("github.com/stowage/stowage") }

// Start starts a span named name under ctx's span.
func Start(ctx context.Context, name string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	return Tracer().Start(ctx, name, trace.WithAttributes(attrs...))
}

// End ends span, recording err (if any) as its status.
func End(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, errdefs.ClassName(err))
	}
	span.End()
}

// Parent returns the W3C traceparent of ctx's span ("" without one): what
// a record keeps so that work resumed later joins the same trace.
func Parent(ctx context.Context) string {
	carrier := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, carrier)
	return carrier["traceparent"]
}

// WithParent returns ctx continuing the trace of traceparent (from
// Parent); ctx unchanged when it is empty or malformed.
func WithParent(ctx context.Context, traceparent string) context.Context {
	if traceparent == "" {
		return ctx
	}
	return propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier{"traceparent": traceparent})
}

// TraceID returns the trace id of ctx's span ("" without one).
func TraceID(ctx context.Context) string {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		return sc.TraceID().String()
	}
	return ""
}

// Detach returns base carrying ctx's span: work that outlives a request
// (an agent's task, a job) stays in the request's trace.
func Detach(base, ctx context.Context) context.Context {
	return trace.ContextWithSpanContext(base, trace.SpanContextFromContext(ctx))
}
