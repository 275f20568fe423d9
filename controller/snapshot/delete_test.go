package snapshot

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stowage/stowage/controller/meta"
	"github.com/stowage/stowage/drivers/s3"
	"github.com/stowage/stowage/drivers/s3/s3test"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// addS3 adds image store s3img in zone z1 on srv through the store service.
func (w *world) addS3(srv *s3test.Server) *stowagev1.DataStore {
	w.t.Helper()
	cred := filepath.Join(w.t.TempDir(), "s3.cred")
	if err := os.WriteFile(cred, fmt.Appendf(nil, "access_key=%s\nsecret_key=%s\n", srv.AccessKey, srv.SecretKey), 0o600); err != nil {
		w.t.Fatal(err)
	}
	st, err := w.stores.Add(w.ctx, &stowagev1.AddStoreRequest{Name: "s3img", Role: imageRole, Provider: s3.Name, Url: "s3://" + srv.Bucket + "/stowage",
		Scope:   &stowagev1.Scope{Zone: "z1"},
		Details: map[string]string{s3.DetailEndpoint: srv.Endpoint, s3.DetailRegion: srv.Region, s3.DetailCredentialsFile: cred}})
	if err != nil {
		w.t.Fatal(err)
	}
	return st
}

func (w *world) waitJob(id string) *stowagev1.Job {
	w.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		j, err := w.runner.Get(w.ctx, id)
		if err != nil {
			w.t.Fatal(err)
		}
		switch j.GetState() {
		case stowagev1.JobState_JOB_STATE_SUCCEEDED, stowagev1.JobState_JOB_STATE_FAILED, stowagev1.JobState_JOB_STATE_CANCELLED:
			return j
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("job %s still %s", id, meta.JobStateName(j.GetState()))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A delete job runs end to end when every copy of the snapshot is a backup
// on an s3 image store (whose driver deletes backups from the
// controller): the copies and the record go, and a hidden sibling that
// nothing needs any more is collected in the same job.
func TestDeleteJobCollectsHidden(t *testing.T) {
	srv := s3test.Start(t)
	w := newWorldWith(t, true)
	img := w.addS3(srv)
	p := w.store("p1", primary, "z1", nil)
	v := w.volume("v", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)

	// s1 was deleted while its primary copy was needed (hidden); that copy
	// has gone since, its backup remains. s2 has only its backup.
	s1, _ := w.snap(v, img, imageRole, "", backedUp, ready)
	if _, err := w.db.Snapshots().Transition(w.ctx, s1.GetId(), meta.SnapshotHide, nil); err != nil {
		t.Fatal(err)
	}
	s2, b2 := w.snap(v, img, imageRole, "", backedUp, ready)
	// A hidden snapshot of another volume is not this job's to collect.
	other := w.volume("other", p, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2)
	o1, _ := w.snap(other, img, imageRole, "", backedUp, ready)
	if _, err := w.db.Snapshots().Transition(w.ctx, o1.GetId(), meta.SnapshotHide, nil); err != nil {
		t.Fatal(err)
	}

	resp, err := w.s.Delete(w.ctx, s2.GetId(), false)
	if err != nil {
		t.Fatal(err)
	}
	if steps := resp.GetPlan().GetSteps(); len(steps) != 1 || steps[0].GetName() != "delete-"+b2.GetId() {
		t.Errorf("plan: %v", resp.GetPlan())
	}
	j := w.waitJob(resp.GetJob().GetId())
	if j.GetState() != stowagev1.JobState_JOB_STATE_SUCCEEDED || !strings.Contains(j.GetResult(), "snapshot "+s2.GetId()+" deleted") {
		t.Fatalf("delete job: %s %q %q", meta.JobStateName(j.GetState()), j.GetError(), j.GetResult())
	}
	for _, id := range []string{s1.GetId(), s2.GetId()} {
		if _, err := w.db.Snapshots().Get(w.ctx, id); err == nil {
			t.Errorf("snapshot %s is still recorded", id)
		}
		if refs, _ := w.db.SnapshotsOnStore().ListBy(w.ctx, meta.IndexSnapshotID, id); len(refs) != 0 {
			t.Errorf("snapshot %s keeps copies %v", id, refs)
		}
	}
	if st := w.snapState(o1.GetId()); st != stowagev1.SnapshotState_SNAPSHOT_STATE_HIDDEN {
		t.Errorf("another volume's hidden snapshot is %s", meta.SnapshotStateName(st))
	}
	if got := w.vol(v.GetId()); got.GetState() != stowagev1.VolumeState_VOLUME_STATE_READY || got.GetBusyJobId() != "" {
		t.Errorf("volume after the delete: %v", got)
	}
}
