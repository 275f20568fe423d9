package main

// The commands every object kind shares: get and list, and the view that
// fetches and prints one object.

import (
	"context"
	"fmt"
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

// maxPages bounds how many pages a list command follows (a million
// records at the controller's default page size of 500).
const maxPages = 2000

// paged is a list response: one page of records and the next page's token.
type paged interface {
	proto.Message
	GetNextPageToken() string
}

// allPages calls fetch with each next_page_token in turn, from "" until a
// page has none, and returns the first response with the records of every
// page appended (proto.Merge appends repeated fields) and no token.
func allPages[R paged](ctx context.Context, fetch func(ctx context.Context, token string) (R, error)) (R, error) {
	all, err := fetch(ctx, "")
	if err != nil {
		return all, err
	}
	token := all.GetNextPageToken()
	for i := 0; token != ""; i++ {
		if i == maxPages {
			return all, fmt.Errorf("list: more than %d pages; narrow it with a filter", maxPages)
		}
		next, err := fetch(ctx, token)
		if err != nil {
			return all, err
		}
		proto.Merge(all, next)
		token = next.GetNextPageToken()
	}
	m := all.ProtoReflect()
	m.Clear(m.Descriptor().Fields().ByName("next_page_token"))
	return all, nil
}
