package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// TestForeignTemplateFormats: a VHD (qemu's vpc), a VHDX and a
// streamOptimized VMDK made by qemu-img convert from one patterned raw
// image are registered as declared, kept as uploaded on the image store,
// and installed as volumes on a primary store by qemu-img convert: each
// volume reads as the original raw bytes (qemu-img compare). A linked
// clone is refused by the planner in favour of a full copy, with the
// reason in the plan. A monolithicFlat VMDK, whose descriptor names a
// separate -flat.vmdk extent file, served without that file, is refused
// at registration with an invalid-argument error and nothing is left on
// the image store.
func TestForeignTemplateFormats(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	needTools(t, "qemu-img", "qemu-io")
	root := t.TempDir()
	web := filepath.Join(root, "web")
	if err := os.MkdirAll(web, 0o755); err != nil {
		t.Fatal(err)
	}
	// 32 MiB (a multiple of the VHD geometry's rounding is not needed:
	// compare treats a larger image's extra bytes as zeros, and they are).
	raw := filepath.Join(root, "orig.raw")
	run(t, "qemu-img", "create", "-q", "-f", "raw", raw, "32M")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 13M 3M", "-c", "write -P 0x77 31M 1M", raw)
	run(t, "qemu-img", "convert", "-q", "-f", "raw", "-O", "vpc", raw, filepath.Join(web, "t.vhd"))
	run(t, "qemu-img", "convert", "-q", "-f", "raw", "-O", "vhdx", raw, filepath.Join(web, "t.vhdx"))
	run(t, "qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, filepath.Join(web, "t.vmdk"))
	// A flat VMDK: t-flat.vmdk holds the data and the descriptor names it;
	// only the descriptor is served.
	flatDir := filepath.Join(root, "flat")
	if err := os.MkdirAll(flatDir, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", raw, filepath.Join(flatDir, "flat.vmdk"))
	if _, err := os.Stat(filepath.Join(flatDir, "flat-flat.vmdk")); err != nil {
		t.Fatalf("monolithicFlat made no separate extent: %v", err)
	}
	desc, err := os.ReadFile(filepath.Join(flatDir, "flat.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(desc), "flat-flat.vmdk") {
		t.Fatalf("descriptor does not name its extent:\n%s", desc)
	}
	if err := os.WriteFile(filepath.Join(web, "flat.vmdk"), desc, 0o644); err != nil {
		t.Fatal(err)
	}

	origin := httptest.NewServer(http.StripPrefix("/t/", http.FileServer(http.Dir(web)))) // loopback
	defer origin.Close()
	addr := freePort(t)
	server := "https://" + addr
	controllerProc(t, addr, filepath.Join(root, "ctl"))
	agentProc(t, server, "h1", "z1", "c1", filepath.Join(root, "a1"))
	agentProc(t, server, "h2", "z1", "c1", filepath.Join(root, "a2"))
	waitFor(t, "h1, h2 Up", 30e9, func() bool {
		return hostState(t, server, "h1") == "HOST_STATE_UP" && hostState(t, server, "h2") == "HOST_STATE_UP"
	})
	a := newAPI(server)
	// The image store and p1 are h1's; p2 is h2's alone: its template
	// cache is a copy across hosts (the file as it is, checked again there).
	img := addStore(t, a, "img", stowagev1.StoreRole_STORE_ROLE_IMAGE, filepath.Join(root, "img"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"})
	p1 := addStore(t, a, "p1", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p1"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h1"})
	p2 := addStore(t, a, "p2", stowagev1.StoreRole_STORE_ROLE_PRIMARY, filepath.Join(root, "p2"), &stowagev1.Scope{Zone: "z1", Cluster: "c1", HostId: "h2"})
	idir := img.GetDetails()["path"]
	ctx := context.Background()

	for _, c := range []struct {
		file, qemu string
		format     stowagev1.ImageFormat
	}{
		{"t.vhd", "vpc", stowagev1.ImageFormat_IMAGE_FORMAT_VHD},
		{"t.vhdx", "vhdx", stowagev1.ImageFormat_IMAGE_FORMAT_VHDX},
		{"t.vmdk", "vmdk", stowagev1.ImageFormat_IMAGE_FORMAT_VMDK},
	} {
		t.Run(c.qemu, func(t *testing.T) {
			r, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{
				Name: "tmpl-" + c.qemu, Url: origin.URL + "/t/" + c.file, Format: c.format,
				Checksum: "sha256:" + sha256File(t, filepath.Join(web, c.file))}))
			if err != nil {
				t.Fatal(err)
			}
			mustSucceed(t, a, r.Msg.GetJob())
			tid := r.Msg.GetTemplate().GetId()
			// Kept as uploaded, in its declared format.
			kept, err := filepath.Glob(filepath.Join(idir, "templates", tid+".*"))
			if err != nil || len(kept) != 1 {
				t.Fatalf("template files on the image store: %v %v", kept, err)
			}
			if sha256File(t, kept[0]) != sha256File(t, filepath.Join(web, c.file)) {
				t.Fatalf("%s is not the uploaded file", kept[0])
			}
			run(t, "qemu-img", "info", "-f", c.qemu, kept[0])

			// A linked clone cannot be backed by it: the planner says so.
			dry, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "dry-" + c.qemu, TemplateId: tid, StoreId: p1.GetId(), DryRun: true}))
			if err != nil {
				t.Fatal(err)
			}
			if s := dry.Msg.GetPlan().GetStrategy(); s != "full" {
				t.Fatalf("plan strategy %q, want full; plan: %v", s, dry.Msg.GetPlan())
			}
			if !strings.Contains(strings.Join(dry.Msg.GetPlan().GetReasons(), "\n"), "overlay cannot be backed") {
				t.Fatalf("the plan does not say why no linked clone: %v", dry.Msg.GetPlan().GetReasons())
			}
			if _, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "lnk-" + c.qemu, TemplateId: tid, StoreId: p1.GetId(), Strategy: "linked", DryRun: true})); err == nil {
				t.Fatal("a linked clone of a foreign template was planned")
			}

			for _, vc := range []struct {
				st *stowagev1.DataStore
				vf stowagev1.ImageFormat
			}{
				{p1, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2}, {p1, stowagev1.ImageFormat_IMAGE_FORMAT_RAW}, {p2, stowagev1.ImageFormat_IMAGE_FORMAT_QCOW2},
			} {
				vf, pdir := vc.vf, vc.st.GetDetails()["path"]
				name := "vol-" + c.qemu + "-" + vc.st.GetName() + "-" + strings.ToLower(strings.TrimPrefix(vf.String(), "IMAGE_FORMAT_"))
				cv, err := a.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: name, TemplateId: tid, StoreId: vc.st.GetId(), Format: vf}))
				if err != nil {
					t.Fatal(err)
				}
				mustSucceed(t, a, cv.Msg.GetJob())
				t.Logf("%s: %s; steps %v", name, strings.Join(cv.Msg.GetPlan().GetReasons(), "; "), cv.Msg.GetPlan().GetSteps())
				gv, err := a.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: cv.Msg.GetVolume().GetId()}))
				if err != nil {
					t.Fatal(err)
				}
				v := gv.Msg.GetVolume()
				if v.GetFormat() != vf {
					t.Fatalf("volume format %s, want %s", v.GetFormat(), vf)
				}
				vfile := filepath.Join(pdir, v.GetInstallPath())
				qf := strings.ToLower(strings.TrimPrefix(vf.String(), "IMAGE_FORMAT_"))
				info := run(t, "qemu-img", "info", "-f", qf, vfile)
				if strings.Contains(info, "backing file") {
					t.Fatalf("volume has a backing file:\n%s", info)
				}
				run(t, "qemu-img", "compare", "-f", "raw", "-F", qf, raw, vfile)
			}
		})
	}

	t.Run("vmdk with an outside extent", func(t *testing.T) {
		before, _ := filepath.Glob(filepath.Join(idir, "templates", "*"))
		r, err := a.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{
			Name: "flat", Url: origin.URL + "/t/flat.vmdk", Format: stowagev1.ImageFormat_IMAGE_FORMAT_VMDK,
			Checksum: "sha256:" + sha256File(t, filepath.Join(web, "flat.vmdk"))}))
		if err != nil {
			t.Fatal(err)
		}
		j := waitJob(t, a, r.Msg.GetJob())
		if j.GetState() != stowagev1.JobState_JOB_STATE_FAILED {
			t.Fatalf("registration of a flat vmdk ended %s", j.GetState())
		}
		if !strings.Contains(j.GetError(), "descriptor file whose extents are separate files") || !strings.Contains(j.GetError(), "invalid") {
			t.Fatalf("registration error does not say why: %q", j.GetError())
		}
		t.Logf("refused: %s", j.GetError())
		after, _ := filepath.Glob(filepath.Join(idir, "templates", "*"))
		all, _ := filepath.Glob(filepath.Join(idir, "templates", ".*"))
		if len(after) != len(before) || len(all) != 0 {
			t.Fatalf("left on the image store: before %v, after %v, hidden %v", before, after, all)
		}
	})
}
