package hostops

import (
	"context"
	"regexp"
	"testing"

	"github.com/stowage/stowage/drivers"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func fetchTask(src string) *stowagev1.Task {
	return &stowagev1.Task{Step: &stowagev1.Task_FetchImage{FetchImage: &stowagev1.FetchImageStep{Source: src, Dest: &stowagev1.ObjectRef{StoreId: "s", Key: "t.raw"}}}}
}

// Moved from agent/proxy with the client.
func TestTaskIDs(t *testing.T) {
	// Without a task id in the context: random, never repeated.
	if a, b := taskID(context.Background(), fetchTask("x")), taskID(context.Background(), fetchTask("x")); a == b {
		t.Fatalf("random ids repeat: %q", a)
	}
	// With one: deterministic per step kind, arguments and occurrence.
	ids := func() []string {
		ctx := drivers.WithTaskID(context.Background(), "job-1.copy")
		return []string{taskID(ctx, fetchTask("a")), taskID(ctx, fetchTask("b")), taskID(ctx, fetchTask("a")),
			taskID(ctx, &stowagev1.Task{Step: &stowagev1.Task_StatObject{StatObject: &stowagev1.StatObjectStep{Ref: &stowagev1.ObjectRef{StoreId: "s", Key: "t.raw"}}}})}
	}
	first, again := ids(), ids()
	for i := range first {
		if first[i] != again[i] {
			t.Fatalf("call %d: %q then %q after a restart", i, first[i], again[i])
		}
	}
	if !regexp.MustCompile(`^job-1\.copy\.fetch_image-[0-9a-f]{12}$`).MatchString(first[0]) {
		t.Errorf("id %q", first[0])
	}
	if first[0] == first[1] || first[2] != first[0]+".2" || first[3] == first[0] {
		t.Errorf("ids %q", first)
	}
	// The task's own id does not change its digest.
	ctx := drivers.WithTaskID(context.Background(), "j")
	withID := fetchTask("a")
	withID.Id = "something"
	if a, b := taskID(ctx, withID), taskID(drivers.WithTaskID(context.Background(), "j"), fetchTask("a")); a != b {
		t.Errorf("%q != %q", a, b)
	}
	// Ids an agent would refuse are hashed.
	long := drivers.WithTaskID(context.Background(), string(make([]byte, 120))+"x")
	if id := taskID(long, fetchTask("a")); !regexp.MustCompile(`^t-[0-9a-f]{64}$`).MatchString(id) {
		t.Errorf("long id %q", id)
	}
}

func TestWireRoundTrip(t *testing.T) {
	for _, in := range []ImageInfo{
		{Key: "a", Format: drivers.FormatQCOW2, VirtualSize: 1, PhysicalSize: 2, HasBacking: true, SHA256: "ff", BytesWritten: 3, BytesSkipped: 4, Method: "linked"},
		{Key: "c", Format: "vmdk"},
		{Key: "d", Format: drivers.FormatISO},
	} {
		if out := ImageInfoFromProto(ImageInfoToProto(in)); out != in {
			t.Errorf("%+v came back as %+v", in, out)
		}
	}
	b := BackupInfo{Manifest: "m", Size: 1, Chunks: 2, ZeroChunks: 3, NewChunks: 4, NewBytes: 5, ReusedBytes: 6, ReadBytes: 7}
	if out := BackupInfoFromProto(BackupInfoToProto(b)); out != b {
		t.Errorf("backup info came back as %+v", out)
	}
	c := CollectInfo{Manifests: 1, Chunks: 2, KeptChunks: 3, RemovedChunks: 4, RemovedBytes: 5}
	if out := CollectInfoFromProto(CollectInfoToProto(c)); out != c {
		t.Errorf("collect info came back as %+v", out)
	}
	for _, m := range []drivers.CloneMode{drivers.CloneReflink, drivers.CloneLinked, drivers.CloneFull} {
		if CloneModeFromProto(CloneModeToProto(m)) != m {
			t.Errorf("clone mode %s", m)
		}
	}
	for _, f := range []drivers.Format{drivers.FormatRaw, drivers.FormatQCOW2, drivers.FormatISO} {
		if FormatFromProto(FormatToProto(f)) != f {
			t.Errorf("format %s", f)
		}
	}
	r := Ref{Store: "s 1", Key: "volumes/v.raw"}
	if got, ok, err := ParseRef(r.URI()); !ok || err != nil || got != r {
		t.Errorf("ParseRef(%s) = %v %v %v", r.URI(), got, ok, err)
	}
}
