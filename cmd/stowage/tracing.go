package main

import (
	"context"
	"log/slog"
	"os"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/stowage/stowage/oteltrace"
)

// tracingFlags are --otlp-endpoint and --otlp-ca-file.
type tracingFlags struct{ endpoint, caFile string }

func (f *tracingFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.endpoint, "otlp-endpoint", os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT"),
		"OTLP/HTTP collector base URL spans are exported to, e.g. https://otel-collector:4318 (http:// for a loopback collector only); empty: no export, trace ids still go to logs and job records (default $OTEL_EXPORTER_OTLP_ENDPOINT)")
	cmd.Flags().StringVar(&f.caFile, "otlp-ca-file", "", "PEM CA bundle the collector's certificate is checked against (default: the system's roots)")
}

// setup installs the process's tracing and returns the interceptor that
// makes a span per Connect call, and the function that flushes the spans
// at the end.
func (f tracingFlags) setup(ctx context.Context, service, instance string, log *slog.Logger) (connect.Interceptor, func(), error) {
	t, err := oteltrace.Setup(ctx, oteltrace.Config{Endpoint: f.endpoint, CAFile: f.caFile, Service: service, Instance: instance})
	if err != nil {
		return nil, nil, usageError{err}
	}
	i, err := t.Interceptor()
	if err != nil {
		return nil, nil, err
	}
	if f.endpoint != "" {
		log.Info("exporting traces", "otlp_endpoint", f.endpoint, "service", service)
	}
	return i, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := t.Shutdown(ctx); err != nil {
			log.Warn("traces not all exported", "err", err)
		}
	}, nil
}
