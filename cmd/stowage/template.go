package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func newTemplateCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "template", Short: "Register, create, inspect and delete templates and ISOs"}
	cmd.AddCommand(newTemplateRegisterCmd(), newTemplateCreateCmd(), newTemplateListCmd(),
		getCmd("get ID|NAME", "Show a template and the stores that hold it", templateView),
		newTemplateDeleteCmd())
	return cmd
}

var templateView = newView("template", func(ctx context.Context, c *clients, id string) (*stowagev1.GetTemplateResponse, error) {
	return msgOf(c.images.GetTemplate(ctx, connect.NewRequest(&stowagev1.GetTemplateRequest{Id: id})))
}, printTemplate)

func newTemplateRegisterCmd() *cobra.Command {
	var f jobFlags
	var name, url, format, checksum, zone string
	var stores []string
	cmd := &cobra.Command{
		Use:   "register --name N --url URL --format raw|qcow2|iso|vhd|vhdx|vmdk [--checksum sha256:HEX]",
		Short: "Download a template or ISO from a URL into image stores",
		Example: `  stowage template register --name ubuntu-24.04 --format qcow2 \
    --url https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img --wait`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fm, err := parseFormat(format, "raw", "qcow2", "iso", "vhd", "vhdx", "vmdk")
			if err != nil {
				return err
			}
			if err := checkChecksum(checksum); err != nil {
				return err
			}
			return runJob(cmd, &f, templateView, "", func(ctx context.Context, c *clients) (jobResponse, error) {
				return started(c.images.RegisterTemplate(ctx, connect.NewRequest(&stowagev1.RegisterTemplateRequest{
					Name: name, Url: url, Format: fm, Checksum: checksum, StoreIds: stores, Zone: zone,
					DryRun: f.dryRun, IdempotencyKey: f.key,
				})))
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&name, "name", "", "template name, unique")
	fl.StringVar(&url, "url", "", "where to download it from: https://, http:// (with --checksum), or file:// beneath the controller's and the agent's --import-dir")
	fl.StringVar(&format, "format", "", "raw, qcow2, iso, vhd (a VHD, qemu's vpc), vhdx or vmdk (monolithic sparse or streamOptimized); vhd, vhdx and vmdk are converted to the primary store's format on install")
	fl.StringVar(&checksum, "checksum", "", "expected checksum: sha256:HEX, sha512:HEX or md5:HEX")
	fl.StringSliceVar(&stores, "store", nil, "image store id or name to hold it (repeatable; default: the one with the most free space)")
	fl.StringVar(&zone, "zone", "", "zone")
	f.register(cmd, true)
	for _, r := range []string{"name", "url", "format"} {
		_ = cmd.MarkFlagRequired(r)
	}
	return cmd
}

func newTemplateCreateCmd() *cobra.Command {
	var f jobFlags
	var name, volume, snapshot, format, store string
	cmd := &cobra.Command{
		Use:   "create --name N (--volume ID | --snapshot ID)",
		Short: "Make a template from a volume or a snapshot",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req := &stowagev1.CreateTemplateRequest{Name: name, StoreId: store}
			switch {
			case (volume == "") == (snapshot == ""):
				return usageError{fmt.Errorf("give exactly one source: --volume ID or --snapshot ID")}
			case volume != "":
				req.Source = &stowagev1.CreateTemplateRequest_VolumeId{VolumeId: volume}
			default:
				req.Source = &stowagev1.CreateTemplateRequest_SnapshotId{SnapshotId: snapshot}
			}
			var err error
			if req.Format, err = parseFormat(format, "raw", "qcow2"); err != nil {
				return err
			}
			return runJob(cmd, &f, templateView, "", func(ctx context.Context, c *clients) (jobResponse, error) {
				req.DryRun, req.IdempotencyKey = f.dryRun, f.key
				return started(c.images.CreateTemplate(ctx, connect.NewRequest(req)))
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&name, "name", "", "template name, unique")
	fl.StringVar(&volume, "volume", "", "volume id to make it from")
	fl.StringVar(&snapshot, "snapshot", "", "snapshot id to make it from")
	fl.StringVar(&format, "format", "", "raw or qcow2 (default: the source's)")
	fl.StringVar(&store, "store", "", "image store id or name (default: the controller picks)")
	f.register(cmd, true)
	_ = cmd.MarkFlagRequired("name")
	return cmd
}

func newTemplateListCmd() *cobra.Command {
	return listCmd("list", "List templates and ISOs", []string{"ID", "NAME", "FORMAT", "VIRTUAL SIZE", "CHECKSUM"},
		func(ctx context.Context, c *clients) (*stowagev1.ListTemplatesResponse, error) {
			return allPages(ctx, func(ctx context.Context, token string) (*stowagev1.ListTemplatesResponse, error) {
				return msgOf(c.images.ListTemplates(ctx, connect.NewRequest(&stowagev1.ListTemplatesRequest{PageToken: token})))
			})
		}, (*stowagev1.ListTemplatesResponse).GetTemplates,
		func(t *stowagev1.Template) []string {
			return []string{t.GetId(), t.GetName(), enumName(t.GetFormat()), humanBytes(t.GetVirtualSize()), shortChecksum(t.GetChecksum())}
		})
}

func newTemplateDeleteCmd() *cobra.Command {
	var force bool
	cmd := jobCmd("delete ID [--force]", "Remove a template from every store", view{kind: "template"}, false,
		func(ctx context.Context, c *clients, id string, f *jobFlags) (jobResponse, error) {
			return started(c.images.DeleteTemplate(ctx, connect.NewRequest(&stowagev1.DeleteTemplateRequest{Id: id, Force: force, DryRun: f.dryRun})))
		})
	cmd.Flags().BoolVar(&force, "force", false, "delete even while volumes depend on it")
	return cmd
}

func printTemplate(w io.Writer, r *stowagev1.GetTemplateResponse) {
	t := r.GetTemplate()
	kv := [][2]string{
		{"ID", t.GetId()},
		{"Name", t.GetName()},
		{"Format", enumName(t.GetFormat())},
		{"ISO", fmt.Sprint(t.GetIsIso())},
		{"URL", orDash(t.GetUrl())},
		{"Checksum", orDash(t.GetChecksum())},
		{"Measured sha256", orDash(t.GetSha256())},
		{"Virtual size", humanBytes(t.GetVirtualSize())},
		{"Created", tsAgo(t.GetCreatedAt())},
	}
	for _, p := range [][2]string{{"From volume", t.GetSourceVolumeId()}, {"From snapshot", t.GetSourceSnapshotId()}} {
		if p[1] != "" {
			kv = append(kv, p)
		}
	}
	keyValues(w, kv)
	if len(r.GetStores()) == 0 {
		return
	}
	fmt.Fprintln(w)
	rows := [][]string{}
	for _, s := range r.GetStores() {
		rows = append(rows, []string{s.GetStoreId(), enumName(s.GetState()), humanBytes(s.GetBytesDone()), humanBytes(s.GetSize()),
			humanBytes(s.GetPhysicalSize()), fmt.Sprint(s.GetRefCount()), orDash(s.GetError())})
	}
	table(w, []string{"STORE", "STATE", "BYTES DONE", "SIZE", "PHYSICAL SIZE", "REF COUNT", "ERROR"}, rows)
}

// checksumHexLen is the hex length of each checksum the API accepts.
var checksumHexLen = map[string]int{"sha256": 64, "sha512": 128, "md5": 32}

// checkChecksum validates --checksum: "" or ALGO:HEX.
func checkChecksum(s string) error {
	if s == "" {
		return nil
	}
	algo, h, _ := strings.Cut(s, ":")
	n, ok := checksumHexLen[algo]
	if _, err := hex.DecodeString(h); !ok || err != nil || len(h) != n {
		return usageError{fmt.Errorf("--checksum %q: want sha256:HEX (64 hex digits), sha512:HEX (128) or md5:HEX (32)", s)}
	}
	return nil
}

// shortChecksum abbreviates a checksum for a table: sha256:0123456789ab….
func shortChecksum(s string) string {
	algo, h, ok := strings.Cut(s, ":")
	if !ok || len(h) <= 12 {
		return orDash(s)
	}
	return algo + ":" + h[:12] + "…"
}
