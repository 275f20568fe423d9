package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func newVolumeCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "volume", Short: "Create, inspect, resize, migrate and delete volumes"}
	cmd.AddCommand(newVolumeCreateCmd(), newVolumeListCmd(),
		getCmd("get ID", "Show one volume", volumeView),
		newVolumeDeleteCmd(), newVolumeResizeCmd(), newVolumeAccessCmd(), newVolumeMigrateCmd())
	return cmd
}

var volumeView = newView("volume", func(ctx context.Context, c *clients, id string) (*stowagev1.GetVolumeResponse, error) {
	return msgOf(c.volumes.GetVolume(ctx, connect.NewRequest(&stowagev1.GetVolumeRequest{Id: id})))
}, func(w io.Writer, r *stowagev1.GetVolumeResponse) { printVolume(w, r.GetVolume()) })

func newVolumeCreateCmd() *cobra.Command {
	var f jobFlags
	var name, size, format, store, template, snapshot, strategy, zone string
	var tags []string
	cmd := &cobra.Command{
		Use:   "create --name N [--size 10G] [--template ID | --snapshot ID] [--tag T]...",
		Short: "Create a blank volume, or one from a template or a snapshot",
		Example: `  stowage volume create --name data1 --size 10G
  stowage volume create --name root1 --template ubuntu-24.04 --strategy linked --wait
  stowage volume create --name db1 --size 100G --tag ssd --dry-run   # where would it go, and why`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req := &stowagev1.CreateVolumeRequest{Name: name, StoreId: store, TemplateId: template, SnapshotId: snapshot, Zone: zone, Tags: tags}
			var err error
			if req.Strategy, err = oneOf("--strategy", strategy, "auto", "clone", "reflink", "linked", "lazy", "full"); err != nil {
				return err
			}
			if req.Format, err = parseFormat(format, "raw", "qcow2"); err != nil {
				return err
			}
			if template != "" && snapshot != "" {
				return usageError{fmt.Errorf("--template and --snapshot: give one source, not both")}
			}
			if size != "" {
				if req.Size, err = parseSizeFlag("--size", size); err != nil {
					return err
				}
			}
			if req.Size <= 0 && template == "" && snapshot == "" {
				return usageError{fmt.Errorf("a blank volume needs a --size, e.g. --size 10G")}
			}
			return runJob(cmd, &f, volumeView, "", func(ctx context.Context, c *clients) (jobResponse, error) {
				req.DryRun, req.IdempotencyKey = f.dryRun, f.key
				return started(c.volumes.CreateVolume(ctx, connect.NewRequest(req)))
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&name, "name", "", "volume name")
	fl.StringVar(&size, "size", "", "size, e.g. 10G, 512M, 1.5GiB; from a template or snapshot, default: its size")
	fl.StringVar(&format, "format", "", "raw or qcow2 (default: the controller picks)")
	fl.StringVar(&store, "store", "", "primary store id or name (default: the controller picks)")
	fl.StringVar(&template, "template", "", "template id or name to create the volume from")
	fl.StringVar(&snapshot, "snapshot", "", "snapshot id to create the volume from")
	fl.StringVar(&strategy, "strategy", "auto", "how to make a volume from a template: auto, clone (the store's own copy-on-write clone: rbd), reflink, linked, lazy (a qcow2 overlay on the template in the host's FUSE template mount, usable at once) or full")
	fl.StringVar(&zone, "zone", "", "zone to place the volume in")
	fl.StringSliceVar(&tags, "tag", nil, "storage tag (repeatable, or comma-separated): only a store carrying all of them qualifies")
	f.register(cmd, true)
	_ = cmd.MarkFlagRequired("name")
	return cmd
}

func newVolumeListCmd() *cobra.Command {
	var store string
	cmd := listCmd("list [--store S]", "List volumes", []string{"ID", "NAME", "STATE", "SIZE", "FORMAT", "STORE", "METHOD"},
		func(ctx context.Context, c *clients) (*stowagev1.ListVolumesResponse, error) {
			return allPages(ctx, func(ctx context.Context, token string) (*stowagev1.ListVolumesResponse, error) {
				return msgOf(c.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{StoreId: store, PageToken: token})))
			})
		}, (*stowagev1.ListVolumesResponse).GetVolumes,
		func(v *stowagev1.Volume) []string {
			return []string{v.GetId(), v.GetName(), enumName(v.GetState()), humanBytes(v.GetSize()),
				enumName(v.GetFormat()), orDash(v.GetStoreId()), orDash(v.GetInstallMethod())}
		})
	cmd.Flags().StringVar(&store, "store", "", "only volumes on this store")
	return cmd
}

func newVolumeDeleteCmd() *cobra.Command {
	return jobCmd("delete ID", "Delete a volume", view{kind: "volume"}, false,
		func(ctx context.Context, c *clients, id string, f *jobFlags) (jobResponse, error) {
			return started(c.volumes.DeleteVolume(ctx, connect.NewRequest(&stowagev1.DeleteVolumeRequest{Id: id, DryRun: f.dryRun})))
		})
}

func newVolumeResizeCmd() *cobra.Command {
	var size string
	cmd := jobCmd("resize ID --size 20G", "Grow a volume", volumeView, false,
		func(ctx context.Context, c *clients, id string, f *jobFlags) (jobResponse, error) {
			n, err := parseSizeFlag("--size", size)
			if err == nil && n == 0 {
				err = usageError{fmt.Errorf("--size 0: want the new size, e.g. --size 20G")}
			}
			if err != nil {
				return nil, err
			}
			return started(c.volumes.ResizeVolume(ctx, connect.NewRequest(&stowagev1.ResizeVolumeRequest{Id: id, Size: n, DryRun: f.dryRun})))
		})
	cmd.Example = "  stowage volume resize 3f2a... --size 20G --wait"
	cmd.Flags().StringVar(&size, "size", "", "new size, e.g. 20G")
	_ = cmd.MarkFlagRequired("size")
	return cmd
}

func newVolumeMigrateCmd() *cobra.Command {
	var store string
	cmd := jobCmd("migrate ID --store S", "Move a volume to another primary store", volumeView, false,
		func(ctx context.Context, c *clients, id string, f *jobFlags) (jobResponse, error) {
			return started(c.volumes.MigrateVolume(ctx, connect.NewRequest(&stowagev1.MigrateVolumeRequest{Id: id, StoreId: store, DryRun: f.dryRun})))
		})
	cmd.Flags().StringVar(&store, "store", "", "destination primary store id or name")
	_ = cmd.MarkFlagRequired("store")
	return cmd
}

func newVolumeAccessCmd() *cobra.Command {
	return accessCmd("volume", "Print the URI a host opens the volume with, or revoke the host's access",
		func(ctx context.Context, c *clients, id, host string, ttl int64) (proto.Message, string, error) {
			resp, err := c.volumes.GrantAccess(ctx, connect.NewRequest(&stowagev1.GrantAccessRequest{Id: id, HostId: host, TtlSeconds: ttl}))
			if err != nil {
				return nil, "", err
			}
			return resp.Msg, resp.Msg.GetUri(), nil
		},
		func(ctx context.Context, c *clients, id, host string) (proto.Message, error) {
			resp, err := c.volumes.RevokeAccess(ctx, connect.NewRequest(&stowagev1.RevokeAccessRequest{Id: id, HostId: host}))
			if err != nil {
				return nil, err
			}
			return resp.Msg, nil
		})
}

// accessCmd is `KIND access ID --host H [--ttl D] [--revoke]`: grant prints
// the URI the host uses, revoke withdraws the host's access.
func accessCmd(kind, short string,
	grant func(ctx context.Context, c *clients, id, host string, ttl int64) (proto.Message, string, error),
	revoke func(ctx context.Context, c *clients, id, host string) (proto.Message, error)) *cobra.Command {
	var host string
	var revoking bool
	var ttl time.Duration
	cmd := &cobra.Command{
		Use:   "access ID --host H [--ttl D] [--revoke]",
		Short: short,
		Args:  exactArgs(1, "a "+kind+" id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withClients(cmd, func(c *clients, asJSON bool) error {
				ctx := cmd.Context()
				if revoking {
					msg, err := revoke(ctx, c, args[0], host)
					if err != nil {
						return c.rpcErr(err)
					}
					return emit(cmd, asJSON, msg, func(w io.Writer) {
						fmt.Fprintf(w, "access to %s %s revoked for host %s\n", kind, args[0], host)
					})
				}
				msg, uri, err := grant(ctx, c, args[0], host, ttlSeconds(ttl))
				if err != nil {
					return c.rpcErr(err)
				}
				return emit(cmd, asJSON, msg, func(w io.Writer) { fmt.Fprintln(w, uri) })
			})
		},
	}
	cmd.Flags().StringVar(&host, "host", "", "host id")
	cmd.Flags().BoolVar(&revoking, "revoke", false, "revoke the host's access instead")
	cmd.Flags().DurationVar(&ttl, "ttl", 0, "how long the access lasts, e.g. 1h (0: no expiry); an export made for it then ends")
	_ = cmd.MarkFlagRequired("host")
	return cmd
}

// ttlSeconds is --ttl in whole seconds, rounded up so that a short TTL
// does not become "no expiry".
func ttlSeconds(d time.Duration) int64 {
	if d < 0 {
		return -1 // refused by the controller
	}
	return int64((d + time.Second - 1) / time.Second)
}

func printVolume(w io.Writer, v *stowagev1.Volume) {
	kv := [][2]string{
		{"ID", v.GetId()},
		{"Name", v.GetName()},
		{"State", enumName(v.GetState())},
		{"Size", humanBytes(v.GetSize())},
		{"Format", enumName(v.GetFormat())},
		{"Store", orDash(v.GetStoreId())},
		{"Path", orDash(v.GetInstallPath())},
		{"Method", orDash(v.GetInstallMethod())},
		{"Template", orDash(v.GetTemplateId())},
		{"Snapshot", orDash(v.GetSnapshotId())},
		{"Attached to", orDash(v.GetAttachedHostId())},
		{"Created", tsAgo(v.GetCreatedAt())},
	}
	for _, p := range [][2]string{{"Tags", strings.Join(v.GetTags(), ", ")}, {"Base ref", v.GetBaseRefId()}, {"Busy with job", v.GetBusyJobId()}, {"Error", v.GetError()}} {
		if p[1] != "" {
			kv = append(kv, p)
		}
	}
	keyValues(w, kv)
}

// parseFormat reads --format: one of valid (raw, qcow2, iso), or "".
func parseFormat(s string, valid ...string) (stowagev1.ImageFormat, error) {
	return enumFlag[stowagev1.ImageFormat]("--format", s, stowagev1.ImageFormat_value, "IMAGE_FORMAT_", valid...)
}

// parseSizeFlag reads a size: "4096" (bytes), "512M", "10G", "1T", "1.5GiB";
// K, M, G and T are binary multiples, "B" and "iB" after them are optional.
func parseSizeFlag(flag, s string) (int64, error) {
	bad := func(why string) error {
		return usageError{fmt.Errorf("%s %q: %s; want a size like 10G, 512M, 1.5GiB or 4096 (bytes)", flag, s, why)}
	}
	t := strings.TrimSpace(s)
	if strings.HasPrefix(t, "-") {
		return 0, bad("a size cannot be negative")
	}
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(t)
	}
	num, unit := t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	shift, ok := unitShift(unit)
	if !ok {
		return 0, bad("unknown unit")
	}
	if num == "" || num == "." || strings.Count(num, ".") > 1 {
		return 0, bad("not a number")
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, bad("not a number")
	}
	n := math.Ldexp(f, int(shift))
	if n >= math.MaxInt64 {
		return 0, bad("too large")
	}
	if n != math.Trunc(n) {
		return 0, bad("not a whole number of bytes")
	}
	if !strings.Contains(num, ".") {
		// Exact for integers beyond float64's 53 bits.
		u, err := strconv.ParseInt(num, 10, 64)
		if err != nil || u > math.MaxInt64>>shift {
			return 0, bad("too large")
		}
		return u << shift, nil
	}
	return int64(n), nil
}

// unitShift is the power of two of a size unit: "", "b" 0; "k", "kb", "kib" 10; ... "t*" 40.
func unitShift(u string) (uint, bool) {
	if u == "" || u == "b" {
		return 0, true
	}
	i := strings.IndexByte("kmgt", u[0])
	if i < 0 {
		return 0, false
	}
	switch u[1:] {
	case "", "b", "ib":
		return uint(10 * (i + 1)), true
	}
	return 0, false
}
