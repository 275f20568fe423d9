package apiauth

import (
	"fmt"
	"strings"

	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// Role is what a token may do. Roles are ordered: a higher one may do all a
// lower one may.
type Role int8

const (
	// Exempt is no token's role: it marks procedures the Guard lets through
	// without a token because something else authenticates them (agents by
	// their mutual-TLS client certificate).
	Exempt Role = -1
	// RoleNone is the zero Role; no token has it.
	RoleNone Role = 0
	// RoleReader may call Get, List and Watch procedures.
	RoleReader Role = 1
	// RoleOperator may also create, change and delete templates, volumes,
	// snapshots and jobs.
	RoleOperator Role = 2
	// RoleAdmin may do everything: stores, hosts, tokens.
	RoleAdmin Role = 3
)

func (r Role) String() string {
	switch r {
	case Exempt:
		return "exempt"
	case RoleReader:
		return "reader"
	case RoleOperator:
		return "operator"
	case RoleAdmin:
		return "admin"
	}
	return fmt.Sprintf("Role(%d)", int8(r))
}

// ParseRole reads "admin", "operator" or "reader".
func ParseRole(s string) (Role, error) {
	for _, r := range []Role{RoleReader, RoleOperator, RoleAdmin} {
		if strings.EqualFold(s, r.String()) {
			return r, nil
		}
	}
	return RoleNone, fmt.Errorf("role %q: want admin, operator or reader: %w", s, errdefs.ErrInvalid)
}

// RoleFromProto converts the API's role; unspecified or unknown is RoleNone.
func RoleFromProto(r stowagev1.TokenRole) Role {
	switch r {
	case stowagev1.TokenRole_TOKEN_ROLE_READER:
		return RoleReader
	case stowagev1.TokenRole_TOKEN_ROLE_OPERATOR:
		return RoleOperator
	case stowagev1.TokenRole_TOKEN_ROLE_ADMIN:
		return RoleAdmin
	}
	return RoleNone
}

// Proto is the API's form of r.
func (r Role) Proto() stowagev1.TokenRole {
	switch r {
	case RoleReader:
		return stowagev1.TokenRole_TOKEN_ROLE_READER
	case RoleOperator:
		return stowagev1.TokenRole_TOKEN_ROLE_OPERATOR
	case RoleAdmin:
		return stowagev1.TokenRole_TOKEN_ROLE_ADMIN
	}
	return stowagev1.TokenRole_TOKEN_ROLE_UNSPECIFIED
}

// Allows reports whether a caller with role r may call a procedure that
// needs role need.
func (r Role) Allows(need Role) bool {
	return need == Exempt || (r >= RoleReader && r >= need)
}

// procedureRoles is the minimum role of every procedure the controller
// serves. TestEveryProcedureHasARole fails when a procedure of stowage/v1
// is missing; RequiredRole answers RoleAdmin for one that is.
var procedureRoles = map[string]Role{
	// Stores are the cloud's infrastructure: admin only, reads aside.
	stowagev1connect.StoreServiceAddStoreProcedure:          RoleAdmin,
	stowagev1connect.StoreServiceGetStoreProcedure:          RoleReader,
	stowagev1connect.StoreServiceListStoresProcedure:        RoleReader,
	stowagev1connect.StoreServiceEnableMaintenanceProcedure: RoleAdmin,
	stowagev1connect.StoreServiceCancelMaintenanceProcedure: RoleAdmin,
	stowagev1connect.StoreServiceDeleteStoreProcedure:       RoleAdmin,
	stowagev1connect.StoreServiceDisableStoreProcedure:      RoleAdmin,
	stowagev1connect.StoreServiceEnableStoreProcedure:       RoleAdmin,
	stowagev1connect.StoreServiceUpdateStoreProcedure:       RoleAdmin,

	stowagev1connect.HostServiceListHostsProcedure: RoleReader,
	stowagev1connect.HostServiceGetHostProcedure:   RoleReader,
	// A join token admits a host into the cloud.
	stowagev1connect.HostServiceCreateJoinTokenProcedure: RoleAdmin,
	// Maintenance takes a host out of placement.
	stowagev1connect.HostServiceEnableHostMaintenanceProcedure: RoleAdmin,
	stowagev1connect.HostServiceCancelHostMaintenanceProcedure: RoleAdmin,

	// Agents authenticate with their client certificate (mutual TLS;
	// controller/enrol checks it names the host), or, to join, with a
	// join token.
	stowagev1connect.AgentControlServiceJoinProcedure:      Exempt,
	stowagev1connect.AgentControlServiceRegisterProcedure:  Exempt,
	stowagev1connect.AgentControlServiceHeartbeatProcedure: Exempt,
	stowagev1connect.AgentControlServiceRenewProcedure:     Exempt,

	stowagev1connect.ImageServiceRegisterTemplateProcedure: RoleOperator,
	stowagev1connect.ImageServiceCreateTemplateProcedure:   RoleOperator,
	stowagev1connect.ImageServiceGetTemplateProcedure:      RoleReader,
	stowagev1connect.ImageServiceListTemplatesProcedure:    RoleReader,
	stowagev1connect.ImageServiceDeleteTemplateProcedure:   RoleOperator,

	stowagev1connect.VolumeServiceCreateVolumeProcedure: RoleOperator,
	stowagev1connect.VolumeServiceGetVolumeProcedure:    RoleReader,
	stowagev1connect.VolumeServiceListVolumesProcedure:  RoleReader,
	stowagev1connect.VolumeServiceDeleteVolumeProcedure: RoleOperator,
	stowagev1connect.VolumeServiceResizeVolumeProcedure: RoleOperator,
	// A grant hands out a read-write nbd:// URI to the volume's bytes:
	// that is a change, not a read.
	stowagev1connect.VolumeServiceGrantAccessProcedure:            RoleOperator,
	stowagev1connect.VolumeServiceRevokeAccessProcedure:           RoleOperator,
	stowagev1connect.SnapshotServiceGrantSnapshotAccessProcedure:  RoleOperator,
	stowagev1connect.SnapshotServiceRevokeSnapshotAccessProcedure: RoleOperator,
	stowagev1connect.VolumeServiceMigrateVolumeProcedure:          RoleOperator,

	stowagev1connect.SnapshotServiceTakeSnapshotProcedure:   RoleOperator,
	stowagev1connect.SnapshotServiceGetSnapshotProcedure:    RoleReader,
	stowagev1connect.SnapshotServiceListSnapshotsProcedure:  RoleReader,
	stowagev1connect.SnapshotServiceRevertSnapshotProcedure: RoleOperator,
	stowagev1connect.SnapshotServiceDeleteSnapshotProcedure: RoleOperator,
	stowagev1connect.SnapshotServiceBackupSnapshotProcedure: RoleOperator,

	stowagev1connect.JobServiceGetJobProcedure:    RoleReader,
	stowagev1connect.JobServiceListJobsProcedure:  RoleReader,
	stowagev1connect.JobServiceCancelJobProcedure: RoleOperator,
	stowagev1connect.JobServiceWatchJobProcedure:  RoleReader,

	stowagev1connect.TokenServiceCreateTokenProcedure: RoleAdmin,
	stowagev1connect.TokenServiceListTokensProcedure:  RoleAdmin,
	stowagev1connect.TokenServiceRevokeTokenProcedure: RoleAdmin,

	// A metadata backup holds every record, API token and join token
	// hashes included.
	stowagev1connect.MetadataServiceBackupProcedure: RoleAdmin,
}

// protocolRoles are the gRPC ecosystem's standard procedures the
// controller serves beside stowage.v1 (controller/api/grpcstd.go).
var protocolRoles = map[string]Role{
	// Reflection describes the whole API (every service, message and
	// field): a read of the API, for readers, as its Get and List.
	"/" + grpcreflect.ReflectV1ServiceName + "/ServerReflectionInfo":      RoleReader,
	"/" + grpcreflect.ReflectV1AlphaServiceName + "/ServerReflectionInfo": RoleReader,
	// Health is open like /healthz: probes (grpc_health_probe,
	// Kubernetes' grpc probes) carry no token, and it says only
	// SERVING or NOT_SERVING.
	"/" + grpchealth.HealthV1ServiceName + "/Check": Exempt,
	"/" + grpchealth.HealthV1ServiceName + "/Watch": Exempt,
}

// RequiredRole is the minimum role for procedure ("/stowage.v1.VolumeService/CreateVolume"):
// its entry in the role table, Exempt for agent procedures, and RoleAdmin
// for a procedure the table does not know (fail closed).
func RequiredRole(procedure string) Role {
	if r, ok := procedureRoles[procedure]; ok {
		return r
	}
	if r, ok := protocolRoles[procedure]; ok {
		return r
	}
	return RoleAdmin
}
