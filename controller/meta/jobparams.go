package meta

import (
	"strconv"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// typedJobParams turns the string parameters of a job recorded before
// schema version 3 into its typed JobParams (migration 3). The job kinds
// and keys are those that version wrote; an unknown kind keeps none.
func typedJobParams(kind string, p map[string]string) *stowagev1.JobParams {
	switch kind {
	case "volume.create":
		f := stowagev1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED
		switch p["format"] {
		case "raw":
			f = stowagev1.ImageFormat_IMAGE_FORMAT_RAW
		case "qcow2":
			f = stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2
		}
		return &stowagev1.JobParams{Kind: &stowagev1.JobParams_VolumeCreate{VolumeCreate: &stowagev1.VolumeCreateParams{
			Format: f, CloneMode: p["mode"], SourceRefId: p["source_ref"], ImageStoreId: p["image_store"]}}}
	case "volume.resize":
		size, _ := strconv.ParseInt(p["size"], 10, 64)
		return &stowagev1.JobParams{Kind: &stowagev1.JobParams_VolumeResize{VolumeResize: &stowagev1.VolumeResizeParams{SizeBytes: size}}}
	case "volume.migrate":
		return &stowagev1.JobParams{Kind: &stowagev1.JobParams_VolumeMigrate{VolumeMigrate: &stowagev1.VolumeMigrateParams{
			SrcStoreId: p["src"], DstStoreId: p["dst"], SrcKey: p["src_path"]}}}
	case "template.create":
		return &stowagev1.JobParams{Kind: &stowagev1.JobParams_TemplateCreate{TemplateCreate: &stowagev1.TemplateCreateParams{
			SourceStoreId: p["source_store"], SourceKey: p["source_path"]}}}
	case "template.delete":
		return &stowagev1.JobParams{Kind: &stowagev1.JobParams_TemplateDelete{TemplateDelete: &stowagev1.TemplateDeleteParams{Force: p["force"] == "true"}}}
	case "snapshot.revert":
		return &stowagev1.JobParams{Kind: &stowagev1.JobParams_SnapshotRevert{SnapshotRevert: &stowagev1.SnapshotRevertParams{RefId: p["ref"]}}}
	case "snapshot.backup":
		return &stowagev1.JobParams{Kind: &stowagev1.JobParams_SnapshotBackup{SnapshotBackup: &stowagev1.SnapshotBackupParams{
			RefId: p["ref"], SrcRefId: p["src"], Kind: stowagev1.SnapshotKind(stowagev1.SnapshotKind_value[p["kind"]])}}}
	}
	return nil
}

// migrateJobParams rewrites every job that has string parameters and no
// typed ones.
func migrateJobParams(kt kvTxn) error {
	return Jobs.rewrite(kt, func(j *stowagev1.Job) bool {
		if len(j.GetParams()) == 0 || j.GetJobParams() != nil {
			return false
		}
		j.JobParams = typedJobParams(j.GetKind(), j.GetParams())
		j.Params = nil
		return true
	})
}
