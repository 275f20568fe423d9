package main

// The commands every object kind shares: get and list, and the view that
// fetches and prints one object.

import (
	"context"
	"io"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"
)

// msgOf unwraps a unary response.
func msgOf[T any](r *connect.Response[T], err error) (*T, error) {
	if err != nil {
		return nil, err
	}
	return r.Msg, nil
}

// view is how to fetch and print one kind of object: a volume, template,
// snapshot or job.
type view struct {
	kind  string
	get   func(ctx context.Context, c *clients, id string) (proto.Message, error)
	human func(w io.Writer, m proto.Message)
}

// newView builds a view from a typed Get call and its printer.
func newView[R proto.Message](kind string, get func(context.Context, *clients, string) (R, error), human func(io.Writer, R)) view {
	return view{
		kind: kind,
		get: func(ctx context.Context, c *clients, id string) (proto.Message, error) {
			r, err := get(ctx, c, id)
			if err != nil {
				return nil, err
			}
			return r, nil
		},
		human: func(w io.Writer, m proto.Message) { human(w, m.(R)) },
	}
}

// emit prints msg as protojson, or calls human.
func emit(cmd *cobra.Command, asJSON bool, msg proto.Message, human func(w io.Writer)) error {
	if asJSON {
		return printProto(cmd.OutOrStdout(), msg)
	}
	human(cmd.OutOrStdout())
	return nil
}

// getCmd is "<kind> get ID": fetch one object and print it.
func getCmd(use, short string, v view) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  exactArgs(1, "a "+v.kind+" id"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withClients(cmd, func(c *clients, asJSON bool) error {
				m, err := v.get(cmd.Context(), c, args[0])
				if err != nil {
					return c.rpcErr(err)
				}
				return emit(cmd, asJSON, m, func(w io.Writer) { v.human(w, m) })
			})
		},
	}
}

// listCmd is "<kind> list": call lists, then print protojson or a table of
// one row per item.
func listCmd[R proto.Message, T any](use, short string, header []string,
	list func(context.Context, *clients) (R, error), items func(R) []T, row func(T) []string) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withClients(cmd, func(c *clients, asJSON bool) error {
				resp, err := list(cmd.Context(), c)
				if err != nil {
					return c.rpcErr(err)
				}
				return emit(cmd, asJSON, resp, func(w io.Writer) {
					rows := [][]string{}
					for _, it := range items(resp) {
						rows = append(rows, row(it))
					}
					table(w, header, rows)
				})
			})
		},
	}
}
