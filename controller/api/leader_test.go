package api

import (
	"testing"

	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// TestReadOnlyProcedures: what a follower serves.
func TestReadOnlyProcedures(t *testing.T) {
	for p, want := range map[string]bool{
		stowagev1connect.VolumeServiceListVolumesProcedure:     true,
		stowagev1connect.JobServiceWatchJobProcedure:           true,
		stowagev1connect.StoreServiceGetStoreProcedure:         true,
		stowagev1connect.MetadataServiceBackupProcedure:        true,
		stowagev1connect.VolumeServiceCreateVolumeProcedure:    false,
		stowagev1connect.AgentControlServiceHeartbeatProcedure: false,
		stowagev1connect.HostServiceCreateJoinTokenProcedure:   false,
		stowagev1connect.TokenServiceRevokeTokenProcedure:      false,
		// A follower answers grpcurl and probes too.
		"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": true,
		"/grpc.health.v1.Health/Check":                              true,
	} {
		if readOnly(p) != want {
			t.Errorf("readOnly(%s) = %v", p, !want)
		}
	}
}
