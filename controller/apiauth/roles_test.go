package apiauth

import (
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// servedElsewhere are the services of stowage/v1 the controller does not
// serve: the agent's (called by the controller over mutual TLS) and the
// template mount's (on a unix socket). Everything else must be in the table.
var servedElsewhere = map[protoreflect.FullName]bool{
	"stowage.v1.AgentService":      true,
	"stowage.v1.ImageCacheService": true,
}

// TestEveryProcedureHasARole walks every method of every service in the
// generated stowage/v1 code: a new RPC without a role table entry fails
// here, and so does an entry for an RPC that no longer exists.
func TestEveryProcedureHasARole(t *testing.T) {
	_ = stowagev1.File_stowage_v1_auth_proto // the generated files register themselves
	seen := map[string]bool{}
	services := 0
	protoregistry.GlobalFiles.RangeFilesByPackage("stowage.v1", func(fd protoreflect.FileDescriptor) bool {
		for i := range fd.Services().Len() {
			sd := fd.Services().Get(i)
			if servedElsewhere[sd.FullName()] {
				continue
			}
			services++
			for j := range sd.Methods().Len() {
				proc := "/" + string(sd.FullName()) + "/" + string(sd.Methods().Get(j).Name())
				seen[proc] = true
				if _, ok := procedureRoles[proc]; !ok {
					t.Errorf("%s has no entry in the role table (roles.go)", proc)
				}
			}
		}
		return true
	})
	if services < 7 {
		t.Fatalf("found %d controller services; the generated code did not register", services)
	}
	for proc := range procedureRoles {
		if !seen[proc] {
			t.Errorf("role table entry %s names no procedure of stowage/v1", proc)
		}
	}
}

func TestRoleOrder(t *testing.T) {
	cases := []struct {
		have, need Role
		ok         bool
	}{
		{RoleReader, RoleReader, true}, {RoleReader, RoleOperator, false}, {RoleOperator, RoleAdmin, false},
		{RoleAdmin, RoleOperator, true}, {RoleNone, RoleReader, false}, {RoleNone, Exempt, true},
	}
	for _, c := range cases {
		if got := c.have.Allows(c.need); got != c.ok {
			t.Errorf("%s allows %s = %v", c.have, c.need, got)
		}
	}
	if RequiredRole("/stowage.v1.NewService/Whatever") != RoleAdmin {
		t.Error("an unknown procedure must need admin")
	}
	for _, s := range []string{"admin", "Operator", "READER"} {
		if r, err := ParseRole(s); err != nil || RoleFromProto(r.Proto()) != r {
			t.Errorf("ParseRole(%q) = %v, %v", s, r, err)
		}
	}
	if _, err := ParseRole("root"); err == nil {
		t.Error("ParseRole(root) must fail")
	}
}

// TestProtocolRoles: reflection describes the API, so it asks for a
// reader; health is open like /healthz (probes carry no token).
func TestProtocolRoles(t *testing.T) {
	for proc, want := range map[string]Role{
		"/grpc.reflection.v1.ServerReflectionInfo/ServerReflectionInfo":  RoleAdmin, // not a procedure: fail closed
		"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      RoleReader,
		"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": RoleReader,
		"/grpc.health.v1.Health/Check":                                   Exempt,
		"/grpc.health.v1.Health/Watch":                                   Exempt,
	} {
		if got := RequiredRole(proc); got != want {
			t.Errorf("RequiredRole(%s) = %s, want %s", proc, got, want)
		}
	}
}
