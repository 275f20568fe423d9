package api

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"

	"github.com/stowage/stowage/errdefs"
)

// The gRPC ecosystem's own protocols, served beside the API on the same
// port so that grpcurl, grpc_health_probe and Kubernetes' grpc probes work
// against a controller:
//
//   - server reflection (grpc.reflection.v1 and v1alpha) describes the
//     services below; it exposes the API's schema, so apiauth's role table
//     asks for a reader token, as for the API's reads;
//   - health (grpc.health.v1) answers SERVING for "" (the whole
//     controller) and for each stowage.v1 service served, when the
//     metadata store answers (Services.Health), NOT_SERVING otherwise. It
//     needs no token, like /healthz: probes carry none.

// ReflectionProcedures are the procedures of server reflection, for the
// role table (apiauth) and the leader gate (reads).
var ReflectionProcedures = []string{
	"/" + grpcreflect.ReflectV1ServiceName + "/ServerReflectionInfo",
	"/" + grpcreflect.ReflectV1AlphaServiceName + "/ServerReflectionInfo",
}

// HealthProcedures are the procedures of the gRPC health protocol.
var HealthProcedures = []string{
	"/" + grpchealth.HealthV1ServiceName + "/Check",
	"/" + grpchealth.HealthV1ServiceName + "/Watch",
}

// grpcStandard mounts reflection over services and health on mux; opts
// are the API's handler options (its interceptors: metrics, error
// mapping, authentication).
func grpcStandard(mux *http.ServeMux, services []string, health func(context.Context) error, opts connect.HandlerOption) {
	reflector := grpcreflect.NewStaticReflector(append(services, grpchealth.HealthV1ServiceName, grpcreflect.ReflectV1ServiceName)...)
	mux.Handle(grpcreflect.NewHandlerV1(reflector, opts))
	mux.Handle(grpcreflect.NewHandlerV1Alpha(reflector, opts))
	mux.Handle(grpchealth.NewHandler(NewHealthChecker(services, health), opts))
}

// HealthChecker answers the gRPC health protocol from one check of the
// whole process: every known service shares its status.
type HealthChecker struct {
	services map[string]bool
	health   func(context.Context) error
}

var _ grpchealth.Checker = (*HealthChecker)(nil)

// NewHealthChecker reports SERVING for "" and each of services while
// health (nil: always healthy) returns nil, NOT_SERVING otherwise; any
// other service name is NotFound, as the protocol asks.
func NewHealthChecker(services []string, health func(context.Context) error) *HealthChecker {
	c := &HealthChecker{services: map[string]bool{"": true}, health: health}
	for _, s := range services {
		c.services[s] = true
	}
	return c
}

// Check implements grpchealth.Checker.
func (c *HealthChecker) Check(ctx context.Context, req *grpchealth.CheckRequest) (*grpchealth.CheckResponse, error) {
	if !c.services[req.Service] {
		return nil, fmt.Errorf("health of service %q: not served here: %w", req.Service, errdefs.ErrNotFound)
	}
	if c.health != nil {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if err := c.health(ctx); err != nil {
			return &grpchealth.CheckResponse{Status: grpchealth.StatusNotServing}, nil
		}
	}
	return &grpchealth.CheckResponse{Status: grpchealth.StatusServing}, nil
}
