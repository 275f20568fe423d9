package hostops

import (
	"context"

	"github.com/stowage/stowage/drivers"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// ISCSITarget is a store's iSCSI target on its target host (an agent
// running a LUN manager, tgtd): its LUNs are files of the store's
// directory, which that agent serves.
type ISCSITarget struct {
	Store string
	IQN   string
	// Initiators are the hosts allowed to log in, each with its CHAP
	// account (the secrets go to the target host only).
	Initiators []ISCSIInitiator
	// Exact makes Initiators the whole set EnsureTarget leaves admitted:
	// any other initiator's ACL entry and CHAP binding are removed and its
	// sessions logged out. Without it EnsureTarget only adds.
	Exact bool
}

// ISCSIInitiator is one host's initiator and CHAP account.
type ISCSIInitiator struct {
	IQN, CHAPUser, CHAPSecret string
}

// LUNRequest names the LUN backed by Key in the target's store.
type LUNRequest struct {
	Target ISCSITarget
	Key    string
	// Size is the LUN's size (create, resize).
	Size int64
}

// LUNInfo describes a LUN.
type LUNInfo struct {
	Number         int
	Key            string
	Size           int64
	AllocatedBytes int64
}

// LUNs manage a store's iSCSI target and LUNs on its target host. Bytes
// reach LUNs through CopyImage (an iscsi:// source or DestURI).
type LUNs interface {
	// EnsureTarget makes the target, its ACL and CHAP accounts what t
	// says (idempotent): t's initiators are admitted, and with t.Exact
	// every other one is revoked and its sessions logged out.
	EnsureTarget(ctx context.Context, t ISCSITarget) error
	// DeleteTarget removes the target (its LUNs' files stay).
	DeleteTarget(ctx context.Context, t ISCSITarget) error
	// CreateLUN creates the sparse backing file (if missing) and its LUN.
	CreateLUN(ctx context.Context, req LUNRequest) (LUNInfo, error)
	// DeleteLUN removes the LUN and its backing file; a missing one is
	// not an error.
	DeleteLUN(ctx context.Context, req LUNRequest) error
	// ResizeLUN grows the backing file and makes the target see the size.
	ResizeLUN(ctx context.Context, req LUNRequest) (LUNInfo, error)
	// ListLUNs lists the target's LUNs.
	ListLUNs(ctx context.Context, t ISCSITarget) ([]LUNInfo, error)
	// ConnectLUN logs the host's kernel initiator in to the LUN at uri (a
	// grant: iscsi://user:secret@portal/iqn/lun?initiator=iqn) and returns
	// its block device as file:///dev/…; safe to repeat.
	ConnectLUN(ctx context.Context, uri drivers.URI) (drivers.URI, error)
	// DisconnectLUN removes the device and logs out when no other LUN of
	// the target is in use on the host; safe to repeat.
	DisconnectLUN(ctx context.Context, uri drivers.URI) error
}

// ConnectLUN implements LUNs.
func (e *Remote) ConnectLUN(ctx context.Context, uri drivers.URI) (drivers.URI, error) {
	return e.uri(ctx, &stowagev1.Task{Step: &stowagev1.Task_ConnectLun{ConnectLun: &stowagev1.ConnectLunStep{Uri: string(uri)}}})
}

// DisconnectLUN implements LUNs.
func (e *Remote) DisconnectLUN(ctx context.Context, uri drivers.URI) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_DisconnectLun{DisconnectLun: &stowagev1.ConnectLunStep{Uri: string(uri)}}}, nil)
	return err
}

// ISCSITargetToProto is the wire form of t.
func ISCSITargetToProto(t ISCSITarget) *stowagev1.IscsiTarget {
	p := &stowagev1.IscsiTarget{StoreId: t.Store, Iqn: t.IQN, Exact: t.Exact}
	for _, i := range t.Initiators {
		p.Initiators = append(p.Initiators, &stowagev1.IscsiInitiator{Iqn: i.IQN, ChapUser: i.CHAPUser, ChapSecret: i.CHAPSecret})
	}
	return p
}

// ISCSITargetFromProto is t from the wire.
func ISCSITargetFromProto(p *stowagev1.IscsiTarget) ISCSITarget {
	t := ISCSITarget{Store: p.GetStoreId(), IQN: p.GetIqn(), Exact: p.GetExact()}
	for _, i := range p.GetInitiators() {
		t.Initiators = append(t.Initiators, ISCSIInitiator{IQN: i.GetIqn(), CHAPUser: i.GetChapUser(), CHAPSecret: i.GetChapSecret()})
	}
	return t
}

// LUNToProto is the wire form of l.
func LUNToProto(l LUNInfo) *stowagev1.LunInfo {
	return &stowagev1.LunInfo{Number: int32(l.Number), Key: l.Key, SizeBytes: l.Size, AllocatedBytes: l.AllocatedBytes}
}

// LUNFromProto is l from the wire.
func LUNFromProto(p *stowagev1.LunInfo) LUNInfo {
	return LUNInfo{Number: int(p.GetNumber()), Key: p.GetKey(), Size: p.GetSizeBytes(), AllocatedBytes: p.GetAllocatedBytes()}
}

// EnsureTarget implements LUNs.
func (e *Remote) EnsureTarget(ctx context.Context, t ISCSITarget) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_EnsureIscsiTarget{EnsureIscsiTarget: &stowagev1.IscsiTargetStep{Target: ISCSITargetToProto(t)}}}, nil)
	return err
}

// DeleteTarget implements LUNs.
func (e *Remote) DeleteTarget(ctx context.Context, t ISCSITarget) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_DeleteIscsiTarget{DeleteIscsiTarget: &stowagev1.IscsiTargetStep{Target: ISCSITargetToProto(t)}}}, nil)
	return err
}

func lunStep(req LUNRequest) *stowagev1.LunStep {
	return &stowagev1.LunStep{Target: ISCSITargetToProto(req.Target), Key: req.Key, SizeBytes: req.Size}
}

func (e *Remote) lun(ctx context.Context, task *stowagev1.Task) (LUNInfo, error) {
	res, err := e.run(ctx, task, nil)
	if err != nil {
		return LUNInfo{}, err
	}
	return LUNFromProto(res.GetLun()), nil
}

// CreateLUN implements LUNs.
func (e *Remote) CreateLUN(ctx context.Context, req LUNRequest) (LUNInfo, error) {
	return e.lun(ctx, &stowagev1.Task{Step: &stowagev1.Task_CreateLun{CreateLun: lunStep(req)}})
}

// DeleteLUN implements LUNs.
func (e *Remote) DeleteLUN(ctx context.Context, req LUNRequest) error {
	_, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_DeleteLun{DeleteLun: lunStep(req)}}, nil)
	return err
}

// ResizeLUN implements LUNs.
func (e *Remote) ResizeLUN(ctx context.Context, req LUNRequest) (LUNInfo, error) {
	return e.lun(ctx, &stowagev1.Task{Step: &stowagev1.Task_ResizeLun{ResizeLun: lunStep(req)}})
}

// ListLUNs implements LUNs.
func (e *Remote) ListLUNs(ctx context.Context, t ISCSITarget) ([]LUNInfo, error) {
	res, err := e.run(ctx, &stowagev1.Task{Step: &stowagev1.Task_ListLuns{ListLuns: &stowagev1.IscsiTargetStep{Target: ISCSITargetToProto(t)}}}, nil)
	if err != nil {
		return nil, err
	}
	out := make([]LUNInfo, 0, len(res.GetLuns().GetLuns()))
	for _, l := range res.GetLuns().GetLuns() {
		out = append(out, LUNFromProto(l))
	}
	return out, nil
}
