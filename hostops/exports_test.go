package hostops

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/stowage/stowage/drivers"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// TestStepOf reads the step back off the ids taskID derives, and nothing
// off the others.
func TestStepOf(t *testing.T) {
	ctx := drivers.WithTaskID(context.Background(), "job-1.copy")
	export := &stowagev1.Task{Step: &stowagev1.Task_Export{Export: &stowagev1.ExportStep{Ref: &stowagev1.ObjectRef{StoreId: "s", Key: "k"}}}}
	nbdExport := &stowagev1.Task{Step: &stowagev1.Task_ExportNbd{ExportNbd: &stowagev1.ExportNbdStep{Ref: &stowagev1.ObjectRef{StoreId: "s", Key: "k"}}}}
	for _, id := range []string{taskID(ctx, export), taskID(ctx, nbdExport), taskID(ctx, export)} {
		if step, ok := StepOf(id); !ok || step != "job-1.copy" {
			t.Errorf("StepOf(%q) = %q %v", id, step, ok)
		}
	}
	long := drivers.WithTaskID(context.Background(), string(make([]byte, 120))+"x")
	for _, id := range []string{taskID(context.Background(), export), taskID(long, export), "", "job-1.copy"} {
		if step, ok := StepOf(id); ok {
			t.Errorf("StepOf(%q) = %q", id, step)
		}
	}
	if s := (Owner{TaskID: taskID(ctx, export), ParentID: "job-9.x"}).Step(); s != "job-9.x" {
		t.Errorf("the parent id comes first: %q", s)
	}
}

// TestParentIDIsNotPartOfTheStep: the parent id a task carries does not
// change the id derived for it, so ids stay what they were before tasks
// carried it (an agent's journal keeps answering them), and listings
// always get a fresh id.
func TestParentIDIsNotPartOfTheStep(t *testing.T) {
	ctx := drivers.WithTaskID(context.Background(), "j")
	with := fetchTask("a")
	with.ParentId = "j"
	if a, b := taskID(ctx, with), taskID(drivers.WithTaskID(context.Background(), "j"), fetchTask("a")); a != b {
		t.Errorf("%q != %q", a, b)
	}
	list := &stowagev1.Task{Step: &stowagev1.Task_ListExports{ListExports: &stowagev1.ListExportsStep{StoreId: "s"}}}
	if a, b := taskID(ctx, list), taskID(ctx, list); a == b {
		t.Errorf("a listing's id repeats: %q", a)
	}
}

func TestExportInfoRoundTrip(t *testing.T) {
	now := time.Now().UTC()
	for _, in := range []ExportInfo{
		{URI: "http://h1:8471/exports/00112233445566778899aabbccddeeff", Kind: ExportHTTP, Ref: Ref{Store: "s1", Key: "volumes/v.raw"},
			Owner: Owner{TaskID: "j.c.export-0123456789ab", ParentID: "j.c"}, SharedWith: []Owner{{ParentID: "k.c"}, {TaskID: "x"}},
			ReadOnly: true, Created: now, Expires: now.Add(time.Hour)},
		{URI: "nbd://h1:10809/00112233445566778899aabbccddeeff", Kind: ExportNBD},
	} {
		if out := ExportInfoFromProto(ExportInfoToProto(in)); !reflect.DeepEqual(out, in) {
			t.Errorf("%+v came back as %+v", in, out)
		}
	}
}
