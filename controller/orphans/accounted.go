package orphans

import (
	"context"
	"fmt"

	"github.com/stowage/stowage/controller/meta"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// accounted is what the records account for on one store, read in one
// snapshot of the metadata.
type accounted struct {
	keys map[string]bool // object keys records point to
	busy map[string]bool // ids an unfinished job works on, or next to
	uris map[string]bool // export URIs recorded on volumes
	jobs map[string]bool // unfinished jobs
	// backingUp: a backup job is unfinished (chunk collection waits).
	backingUp bool
}

// unfinished are the job states a job can still act in.
var unfinished = []stowagev1.JobState{
	stowagev1.JobState_JOB_STATE_PENDING, stowagev1.JobState_JOB_STATE_RUNNING, stowagev1.JobState_JOB_STATE_CANCELLING,
}

func (r *Reconciler) accounted(ctx context.Context, storeID string) (accounted, error) {
	a := accounted{keys: map[string]bool{}, busy: map[string]bool{}, uris: map[string]bool{}, jobs: map[string]bool{}}
	err := r.db.View(ctx, func(tx *meta.Tx) error {
		vols, err := meta.Volumes.ListTx(tx, meta.Filter[*stowagev1.Volume]{})
		if err != nil {
			return err
		}
		for _, v := range vols {
			if v.GetNbdExportUri() != "" {
				a.uris[v.GetNbdExportUri()] = true
			}
			if v.GetStoreId() == storeID && v.GetState() != stowagev1.VolumeState_VOLUME_STATE_EXPUNGED && v.GetInstallPath() != "" {
				a.keys[v.GetInstallPath()] = true
			}
		}
		toss, err := meta.TemplatesOnStore.ListTx(tx, meta.Filter[*stowagev1.TemplateOnStore]{Index: meta.IndexStoreID, Value: storeID})
		if err != nil {
			return err
		}
		for _, t := range toss {
			if t.GetState() != stowagev1.ObjectState_OBJECT_STATE_DESTROYED && t.GetInstallPath() != "" {
				a.keys[t.GetInstallPath()] = true
			}
		}
		soss, err := meta.SnapshotsOnStore.ListTx(tx, meta.Filter[*stowagev1.SnapshotOnStore]{Index: meta.IndexStoreID, Value: storeID})
		if err != nil {
			return err
		}
		all, err := meta.SnapshotsOnStore.ListTx(tx, meta.Filter[*stowagev1.SnapshotOnStore]{})
		if err != nil {
			return err
		}
		for _, s := range all {
			if s.GetNbdExportUri() != "" {
				a.uris[s.GetNbdExportUri()] = true
			}
		}
		for _, s := range soss {
			if s.GetState() != stowagev1.ObjectState_OBJECT_STATE_DESTROYED && s.GetInstallPath() != "" {
				a.keys[s.GetInstallPath()] = true
			}
		}
		for _, state := range unfinished {
			js, err := meta.Jobs.ListInStateTx(tx, state)
			if err != nil {
				return err
			}
			for _, j := range js {
				a.jobs[j.GetId()] = true
				if err := a.markBusy(tx, j); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return a, fmt.Errorf("read the records of store %s: %w", storeID, err)
	}
	return a, nil
}

// markBusy marks the target of unfinished job j and the records next to
// it (a volume's template and snapshot, a snapshot's volume and copies, a
// template's source) as worked on: their objects may exist before the
// records that will point to them are written (a migration's destination,
// a template copy a volume create makes).
func (a *accounted) markBusy(tx *meta.Tx, j *stowagev1.Job) error {
	id := j.GetTargetId()
	a.busy[id] = true
	if v, err := meta.Volumes.GetTx(tx, id); err == nil {
		for _, x := range []string{v.GetTemplateId(), v.GetSnapshotId(), v.GetBaseRefId(), v.GetHeadSnapshotRefId()} {
			a.busy[x] = true
		}
	}
	if s, err := meta.Snapshots.GetTx(tx, id); err == nil {
		a.busy[s.GetVolumeId()] = true
		a.backingUp = true // taking, backing up, restoring or deleting: chunks may be in flight
		refs, err := meta.SnapshotsOnStore.ListTx(tx, meta.Filter[*stowagev1.SnapshotOnStore]{Index: meta.IndexSnapshotID, Value: id})
		if err != nil {
			return err
		}
		for _, r := range refs {
			a.busy[r.GetId()] = true
		}
	}
	if t, err := meta.Templates.GetTx(tx, id); err == nil {
		a.busy[t.GetSourceVolumeId()] = true
		a.busy[t.GetSourceSnapshotId()] = true
	}
	delete(a.busy, "")
	return nil
}
