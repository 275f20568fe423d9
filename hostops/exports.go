package hostops

import (
	"context"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/stowage/stowage/drivers"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// ExportKind is how an export serves its object.
type ExportKind int

// The export kinds.
const (
	ExportUnknown ExportKind = iota
	// ExportHTTP is an Export: http(s)://agent/exports/<token>.
	ExportHTTP
	// ExportNBD is an ExportNBD: nbd(s)://agent:port/<name>.
	ExportNBD
)

// String implements fmt.Stringer.
func (k ExportKind) String() string {
	switch k {
	case ExportHTTP:
		return "http"
	case ExportNBD:
		return "nbd"
	}
	return "unknown"
}

// Owner is the task an export was made under.
type Owner struct {
	// TaskID is the id of the agent's task that made the export (the
	// ExportStep or ExportNbdStep; "" when unknown).
	TaskID string
	// ParentID is the task id of the controller's plan step that task was
	// one call of (drivers.TaskIDFrom of the call's context; "" if none):
	// which job made the export.
	ParentID string
}

// IsZero reports whether o names no task.
func (o Owner) IsZero() bool { return o == Owner{} }

// ExportInfo is one live export of a host (ListExports).
type ExportInfo struct {
	// URI is the export as Export or ExportNBD returned it: what Unexport
	// or UnexportNBD accept. It is the capability itself: never log it.
	URI  drivers.URI
	Kind ExportKind
	// Ref is the object it serves (zero for an export made before exports
	// recorded it).
	Ref   Ref
	Owner Owner
	// SharedWith are the owners of the later Exports of the same file that
	// joined an HTTP export (one export per file is shared; it ends when
	// each Export of it has been unexported, or when it expires). An
	// Unexport does not say whose it is, so they stay listed until the
	// export ends.
	SharedWith []Owner
	ReadOnly   bool
	Created    time.Time // zero: unknown (made before exports recorded it)
	Expires    time.Time // zero: never
}

// ownerKey is the context key of the task a Host call runs as.
type ownerKey struct{}

// WithOwner returns ctx naming the task a call on a Host runs as; the
// agent's Execute sets it from the wire task so that an export records the
// task it was made under.
func WithOwner(ctx context.Context, o Owner) context.Context {
	return context.WithValue(ctx, ownerKey{}, o)
}

// OwnerFrom returns the task WithOwner put in ctx; without one, a call
// made in-process (no wire task) is owned by the context's step
// (drivers.TaskIDFrom) as its ParentID.
func OwnerFrom(ctx context.Context) Owner {
	if o, ok := ctx.Value(ownerKey{}).(Owner); ok {
		return o
	}
	id, _ := drivers.TaskIDFrom(ctx)
	return Owner{ParentID: id}
}

// ExportKindToProto converts an ExportKind to the wire.
func ExportKindToProto(k ExportKind) stowagev1.ExportKind {
	switch k {
	case ExportHTTP:
		return stowagev1.ExportKind_EXPORT_KIND_HTTP
	case ExportNBD:
		return stowagev1.ExportKind_EXPORT_KIND_NBD
	}
	return stowagev1.ExportKind_EXPORT_KIND_UNSPECIFIED
}

// ExportKindFromProto converts an ExportKind from the wire.
func ExportKindFromProto(k stowagev1.ExportKind) ExportKind {
	switch k {
	case stowagev1.ExportKind_EXPORT_KIND_HTTP:
		return ExportHTTP
	case stowagev1.ExportKind_EXPORT_KIND_NBD:
		return ExportNBD
	}
	return ExportUnknown
}

func ownerToProto(o Owner) *stowagev1.ExportOwner {
	if o.IsZero() {
		return nil
	}
	return &stowagev1.ExportOwner{TaskId: o.TaskID, ParentId: o.ParentID}
}

func ownerFromProto(o *stowagev1.ExportOwner) Owner {
	return Owner{TaskID: o.GetTaskId(), ParentID: o.GetParentId()}
}

func timeToProto(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func timeFromProto(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

// ExportInfoToProto converts an ExportInfo to the wire.
func ExportInfoToProto(x ExportInfo) *stowagev1.ExportInfo {
	p := &stowagev1.ExportInfo{Uri: string(x.URI), Kind: ExportKindToProto(x.Kind), Owner: ownerToProto(x.Owner),
		Created: timeToProto(x.Created), Expires: timeToProto(x.Expires), ReadOnly: x.ReadOnly}
	if !x.Ref.IsZero() {
		p.Ref = RefToProto(x.Ref)
	}
	for _, o := range x.SharedWith {
		p.SharedWith = append(p.SharedWith, ownerToProto(o))
	}
	return p
}

// ExportInfoFromProto converts an ExportInfo from the wire.
func ExportInfoFromProto(p *stowagev1.ExportInfo) ExportInfo {
	x := ExportInfo{URI: drivers.URI(p.GetUri()), Kind: ExportKindFromProto(p.GetKind()), Owner: ownerFromProto(p.GetOwner()),
		Created: timeFromProto(p.GetCreated()), Expires: timeFromProto(p.GetExpires()), ReadOnly: p.GetReadOnly()}
	if p.GetRef() != nil {
		x.Ref = RefFromProto(p.GetRef())
	}
	for _, o := range p.GetSharedWith() {
		x.SharedWith = append(x.SharedWith, ownerFromProto(o))
	}
	return x
}

// ListExports implements Exports. The task gets a fresh id whatever the
// context carries (a listing is a read that must be current, never a
// journalled result), and the agent answers it without journalling it.
func (e *Remote) ListExports(ctx context.Context, store string) ([]ExportInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ListExports{ListExports: &stowagev1.ListExportsStep{StoreId: store}}}, nil)
	if err != nil {
		return nil, err
	}
	out := make([]ExportInfo, 0, len(res.GetExports().GetExports()))
	for _, p := range res.GetExports().GetExports() {
		out = append(out, ExportInfoFromProto(p))
	}
	return out, nil
}

// GrantOf is the drivers.Grant of export x of host: its Access is what a
// driver's RevokeAccess needs to end it (URI, HostID, Revocable), its
// TaskID the step it was made under (StepOf for an export made before
// tasks carried their step).
func GrantOf(host string, x ExportInfo) drivers.Grant {
	g := drivers.Grant{
		Access:  drivers.Access{URI: x.URI, ReadOnly: x.ReadOnly, Expires: x.Expires, Revocable: true, HostID: host},
		Key:     x.Ref.Key,
		TaskID:  x.Owner.Step(),
		Created: x.Created,
	}
	for _, o := range x.SharedWith {
		if id := o.Step(); id != "" {
			g.SharedWith = append(g.SharedWith, id)
		}
	}
	return g
}

// Step is the step task id (drivers.TaskIDFrom of the caller) o's task ran
// for: ParentID, or for a task that did not carry it, read off TaskID
// (StepOf; "" when it cannot be).
func (o Owner) Step() string {
	if o.ParentID != "" {
		return o.ParentID
	}
	id, _ := StepOf(o.TaskID)
	return id
}
