package main

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

func newStoreCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "store",
		Short: "Add, inspect, maintain and remove primary and image stores",
	}
	cmd.AddCommand(newStoreAddCmd(), newStoreListCmd(), newStoreGetCmd(),
		newStoreMaintainCmd(), newStoreCancelMaintainCmd(), newStoreDisableCmd(), newStoreEnableCmd(),
		newStoreUpdateCmd(), newStoreDeleteCmd())
	return cmd
}

func parseRole(s string) (stowagev1.StoreRole, error) {
	switch strings.ToLower(s) {
	case "primary":
		return stowagev1.StoreRole_STORE_ROLE_PRIMARY, nil
	case "image":
		return stowagev1.StoreRole_STORE_ROLE_IMAGE, nil
	case "image-cache":
		return stowagev1.StoreRole_STORE_ROLE_IMAGE_CACHE, nil
	case "":
		return stowagev1.StoreRole_STORE_ROLE_UNSPECIFIED, nil
	}
	return 0, usageError{fmt.Errorf("--role %q: want primary, image or image-cache", s)}
}

// parseScope reads zone[/cluster[/host]].
func parseScope(s string) (*stowagev1.Scope, error) {
	parts := strings.Split(s, "/")
	if s == "" || len(parts) > 3 || parts[0] == "" {
		return nil, usageError{fmt.Errorf("--scope %q: want zone, zone/cluster or zone/cluster/host-id", s)}
	}
	sc := &stowagev1.Scope{Zone: parts[0]}
	if len(parts) > 1 {
		sc.Cluster = parts[1]
	}
	if len(parts) > 2 {
		sc.HostId = parts[2]
	}
	return sc, nil
}

func scopeString(s *stowagev1.Scope) string {
	out := s.GetZone()
	if s.GetCluster() != "" || s.GetHostId() != "" {
		out += "/" + s.GetCluster()
	}
	if s.GetHostId() != "" {
		out += "/" + s.GetHostId()
	}
	return out
}

func newStoreAddCmd() *cobra.Command {
	var name, role, provider, url, scope string
	var tags []string
	var details map[string]string
	var th thresholdFlags
	cmd := &cobra.Command{
		Use:   "add --name N --role primary|image --provider filesystem --url file:///path [--scope zone/cluster/host]",
		Short: "Add a data store",
		Example: `  stowage store add --name primary1 --role primary --provider filesystem --url file:///srv/stowage/primary1
  stowage store add --name images --role image --provider filesystem --url file:///mnt/nfs/images --scope zone1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			r, err := parseRole(role)
			if err != nil {
				return err
			}
			sc, err := parseScope(scope)
			if err != nil {
				return err
			}
			c, err := newClients(cmd)
			if err != nil {
				return err
			}
			resp, err := c.stores.AddStore(cmd.Context(), connect.NewRequest(&stowagev1.AddStoreRequest{
				Name: name, Role: r, Provider: provider, Url: url, Scope: sc, Tags: tags, Details: details,
				CapacityDisableThreshold: th.disable(cmd), CapacityNotifyThreshold: th.notify(cmd),
			}))
			if err != nil {
				return c.rpcErr(err)
			}
			return printStore(cmd, asJSON, resp.Msg.GetStore())
		},
	}
	f := cmd.Flags()
	f.StringVar(&name, "name", "", "store name, unique (letters, digits, . _ -)")
	f.StringVar(&role, "role", "", "primary or image")
	f.StringVar(&provider, "provider", "filesystem", "storage provider")
	f.StringVar(&url, "url", "", "where the store is, e.g. file:///srv/stowage/primary1")
	f.StringVar(&scope, "scope", "default", "zone, zone/cluster or zone/cluster/host-id")
	f.StringSliceVar(&tags, "tag", nil, "storage tag (repeatable, or comma-separated): volumes asking for tags land only on stores carrying all of them")
	f.StringToStringVar(&details, "details", nil, "provider details, k=v[,k=v...] (s3: endpoint, region, credentials_file; iscsi: target_host, backing_dir; rbd: keyring)")
	th.register(cmd, "")
	_ = cmd.MarkFlagRequired("name")
	_ = cmd.MarkFlagRequired("role")
	_ = cmd.MarkFlagRequired("url")
	return cmd
}

func newStoreListCmd() *cobra.Command {
	var role, zone string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List data stores",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			r, err := parseRole(role)
			if err != nil {
				return err
			}
			c, err := newClients(cmd)
			if err != nil {
				return err
			}
			resp, err := allPages(cmd.Context(), func(ctx context.Context, token string) (*stowagev1.ListStoresResponse, error) {
				return msgOf(c.stores.ListStores(ctx, connect.NewRequest(&stowagev1.ListStoresRequest{Role: r, Zone: zone, PageToken: token})))
			})
			if err != nil {
				return c.rpcErr(err)
			}
			if asJSON {
				return printProto(cmd.OutOrStdout(), resp)
			}
			rows := [][]string{}
			for _, s := range resp.GetStores() {
				rows = append(rows, []string{s.GetId(), s.GetName(), stateName(s.GetRole()), s.GetProvider(), stateName(s.GetState()),
					scopeString(s.GetScope()), humanBytes(s.GetAvailableBytes()) + " / " + humanBytes(s.GetCapacityBytes()), s.GetUrl()})
			}
			table(cmd.OutOrStdout(), []string{"ID", "NAME", "ROLE", "PROVIDER", "STATE", "SCOPE", "FREE / CAPACITY", "URL"}, rows)
			return nil
		},
	}
	cmd.Flags().StringVar(&role, "role", "", "only stores of this role")
	cmd.Flags().StringVar(&zone, "zone", "", "only stores in this zone")
	return cmd
}

func newStoreGetCmd() *cobra.Command {
	return storeCmd("get ID|NAME", "Show one data store", func(ctx context.Context, c *clients, id string) (*stowagev1.DataStore, error) {
		resp, err := c.stores.GetStore(ctx, connect.NewRequest(&stowagev1.GetStoreRequest{Id: id}))
		if err != nil {
			return nil, err
		}
		return resp.Msg.GetStore(), nil
	})
}

func newStoreMaintainCmd() *cobra.Command {
	return storeCmd("maintain ID|NAME", "Put an Up store into maintenance", func(ctx context.Context, c *clients, id string) (*stowagev1.DataStore, error) {
		return storeOf(msgOf(c.stores.EnableMaintenance(ctx, connect.NewRequest(&stowagev1.EnableMaintenanceRequest{Id: id}))))
	})
}

func newStoreCancelMaintainCmd() *cobra.Command {
	return storeCmd("cancel-maintain ID|NAME", "Bring a store in maintenance back Up", func(ctx context.Context, c *clients, id string) (*stowagev1.DataStore, error) {
		return storeOf(msgOf(c.stores.CancelMaintenance(ctx, connect.NewRequest(&stowagev1.CancelMaintenanceRequest{Id: id}))))
	})
}

func newStoreDisableCmd() *cobra.Command {
	return storeCmd("disable ID|NAME", "Stop placing new objects on an Up store (what it holds stays served)", func(ctx context.Context, c *clients, id string) (*stowagev1.DataStore, error) {
		return storeOf(msgOf(c.stores.DisableStore(ctx, connect.NewRequest(&stowagev1.DisableStoreRequest{Id: id}))))
	})
}

func newStoreEnableCmd() *cobra.Command {
	return storeCmd("enable ID|NAME", "Bring a Disabled store back Up", func(ctx context.Context, c *clients, id string) (*stowagev1.DataStore, error) {
		return storeOf(msgOf(c.stores.EnableStore(ctx, connect.NewRequest(&stowagev1.EnableStoreRequest{Id: id}))))
	})
}

// storeOf returns the store of a reply that carries one.
func storeOf[M interface{ GetStore() *stowagev1.DataStore }](m M, err error) (*stowagev1.DataStore, error) {
	if err != nil {
		return nil, err
	}
	return m.GetStore(), nil
}

// thresholdFlags are --disable-threshold and --notify-threshold.
type thresholdFlags struct{ disableV, notifyV float64 }

func (t *thresholdFlags) register(cmd *cobra.Command, clear string) {
	cmd.Flags().Float64Var(&t.disableV, "disable-threshold", 0, "fraction of the capacity in use at which no new object is placed on the store, in (0, 1]; default: the controller's --capacity-disable-threshold"+clear)
	cmd.Flags().Float64Var(&t.notifyV, "notify-threshold", 0, "fraction of the capacity in use above which the StowageStoreCapacityNotify alert fires, in (0, 1]; default: the controller's --capacity-notify-threshold"+clear)
}

func (t *thresholdFlags) disable(cmd *cobra.Command) *float64 {
	return flagFloat(cmd, "disable-threshold", t.disableV)
}

func (t *thresholdFlags) notify(cmd *cobra.Command) *float64 {
	return flagFloat(cmd, "notify-threshold", t.notifyV)
}

// flagFloat is v when the flag name was given, else nil.
func flagFloat(cmd *cobra.Command, name string, v float64) *float64 {
	if !cmd.Flags().Changed(name) {
		return nil
	}
	return &v
}

func newStoreUpdateCmd() *cobra.Command {
	var tags []string
	var th thresholdFlags
	cmd := &cobra.Command{
		Use:   "update ID|NAME [--tag T]... [--disable-threshold F] [--notify-threshold F]",
		Short: "Change a store's storage tags or capacity thresholds",
		Example: `  stowage store update primary1 --tag ssd --tag rack1
  stowage store update primary1 --tag ''            # no tags
  stowage store update primary1 --disable-threshold 0.9 --notify-threshold 0.8
  stowage store update primary1 --disable-threshold -1   # back to the controller's default`,
		Args: exactArgs(1, "a store id or name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &stowagev1.UpdateStoreRequest{Id: args[0],
				CapacityDisableThreshold: th.disable(cmd), CapacityNotifyThreshold: th.notify(cmd)}
			if cmd.Flags().Changed("tag") {
				req.Tags = &stowagev1.StoreTags{}
				for _, t := range tags {
					if t != "" {
						req.Tags.Values = append(req.Tags.Values, t)
					}
				}
			}
			if req.Tags == nil && req.CapacityDisableThreshold == nil && req.CapacityNotifyThreshold == nil {
				return usageError{fmt.Errorf("%s: nothing to change: give --tag, --disable-threshold or --notify-threshold", cmd.CommandPath())}
			}
			return withClients(cmd, func(c *clients, asJSON bool) error {
				st, err := storeOf(msgOf(c.stores.UpdateStore(cmd.Context(), connect.NewRequest(req))))
				if err != nil {
					return c.rpcErr(err)
				}
				return printStore(cmd, asJSON, st)
			})
		},
	}
	cmd.Flags().StringSliceVar(&tags, "tag", nil, "the store's storage tags become these (repeatable, or comma-separated; --tag '' clears them)")
	th.register(cmd, "; a negative value clears the store's own")
	return cmd
}

// storeCmd is a command that takes one store id or name, calls the
// controller and prints the store it returns.
func storeCmd(use, short string, call func(ctx context.Context, c *clients, id string) (*stowagev1.DataStore, error)) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  exactArgs(1, "a store id or name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withClients(cmd, func(c *clients, asJSON bool) error {
				st, err := call(cmd.Context(), c, args[0])
				if err != nil {
					return c.rpcErr(err)
				}
				return printStore(cmd, asJSON, st)
			})
		},
	}
}

func newStoreDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "delete ID|NAME",
		Short: "Remove a store that holds no objects (the directory and its data stay)",
		Args:  exactArgs(1, "a store id or name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := outputJSON(cmd)
			if err != nil {
				return err
			}
			c, err := newClients(cmd)
			if err != nil {
				return err
			}
			if _, err := c.stores.DeleteStore(cmd.Context(), connect.NewRequest(&stowagev1.DeleteStoreRequest{Id: args[0]})); err != nil {
				return c.rpcErr(err)
			}
			if asJSON {
				fmt.Fprintf(cmd.OutOrStdout(), "{\"deleted\": %q}\n", args[0])
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "store %s deleted\n", args[0])
			return nil
		},
	}
}

func printStore(cmd *cobra.Command, asJSON bool, s *stowagev1.DataStore) error {
	if asJSON {
		return printProto(cmd.OutOrStdout(), s)
	}
	hosts := append([]string(nil), s.GetHostIds()...)
	sort.Strings(hosts)
	kv := [][2]string{
		{"ID", s.GetId()},
		{"Name", s.GetName()},
		{"Role", stateName(s.GetRole())},
		{"Provider", s.GetProvider()},
		{"URL", s.GetUrl()},
		{"Scope", scopeString(s.GetScope())},
		{"State", stateName(s.GetState())},
		{"Capacity", humanBytes(s.GetCapacityBytes())},
		{"Available", humanBytes(s.GetAvailableBytes())},
		{"Thresholds", thresholdsText(s)},
		{"Hosts", orDash(strings.Join(hosts, ", "))},
	}
	if s.GetStateReason() != "" {
		kv = append(kv, [2]string{"Reason", s.GetStateReason()})
	}
	if len(s.GetTags()) > 0 {
		kv = append(kv, [2]string{"Tags", strings.Join(s.GetTags(), ", ")})
	}
	keyValues(cmd.OutOrStdout(), kv)
	return nil
}

// thresholdsText shows the capacity thresholds in force and whose they are.
func thresholdsText(s *stowagev1.DataStore) string {
	whose := func(own *float64) string {
		if own == nil {
			return " (default)"
		}
		return ""
	}
	used := ""
	if c := s.GetCapacityBytes(); c > 0 {
		used = fmt.Sprintf("; %.1f%% used", float64(c-s.GetAvailableBytes())*100/float64(c))
	}
	return fmt.Sprintf("disable at %.0f%%%s, notify above %.0f%%%s%s",
		s.GetEffectiveDisableThreshold()*100, whose(s.CapacityDisableThreshold),
		s.GetEffectiveNotifyThreshold()*100, whose(s.CapacityNotifyThreshold), used)
}

// exactArgs is cobra.ExactArgs with a message that says what is missing.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError{fmt.Errorf("%s takes %s (got %d arguments)", cmd.CommandPath(), what, len(args))}
		}
		return nil
	}
}
