package main

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"unicode"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/errdefs/errconnect"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
)

// clients are the controller's API clients for one command invocation.
type clients struct {
	url       string // the first controller
	all       string // every controller given, comma-separated
	stores    stowagev1connect.StoreServiceClient
	hosts     stowagev1connect.HostServiceClient
	images    stowagev1connect.ImageServiceClient
	volumes   stowagev1connect.VolumeServiceClient
	snapshots stowagev1connect.SnapshotServiceClient
	jobs      stowagev1connect.JobServiceClient
	tokens    stowagev1connect.TokenServiceClient
	// watch is JobService without an overall timeout: a watch lasts as
	// long as its job.
	watch stowagev1connect.JobServiceClient
}

func newClients(cmd *cobra.Command) (*clients, error) {
	conn, err := connectionOf(cmd)
	if err != nil {
		return nil, err
	}
	url, hc, cred := conn.url, conn.client, conn.credentials(cmd)
	return &clients{
		url:       url,
		all:       conn.all,
		stores:    stowagev1connect.NewStoreServiceClient(hc, url, cred),
		hosts:     stowagev1connect.NewHostServiceClient(hc, url, cred),
		images:    stowagev1connect.NewImageServiceClient(hc, url, cred),
		volumes:   stowagev1connect.NewVolumeServiceClient(hc, url, cred),
		snapshots: stowagev1connect.NewSnapshotServiceClient(hc, url, cred),
		jobs:      stowagev1connect.NewJobServiceClient(hc, url, cred),
		tokens:    stowagev1connect.NewTokenServiceClient(hc, url, cred),
		watch:     stowagev1connect.NewJobServiceClient(&http.Client{Transport: hc.Transport}, url, cred),
	}, nil
}

// withClients validates --output, builds the clients and runs fn.
func withClients(cmd *cobra.Command, fn func(c *clients, asJSON bool) error) error {
	asJSON, err := outputJSON(cmd)
	if err != nil {
		return err
	}
	c, err := newClients(cmd)
	if err != nil {
		return err
	}
	return fn(c, asJSON)
}

// rpcErr turns an RPC error into a classed error with a hint on what to do.
func (c *clients) rpcErr(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Code() == connect.CodeUnavailable && strings.Contains(ce.Message(), "dial") {
		return fmt.Errorf("cannot reach the controller at %s (%s); is `stowage controller` or `stowage dev` running? Set --server or STOWAGE_SERVER: %w",
			c.url, ce.Message(), errdefs.ErrUnavailable)
	}
	return errconnect.FromConnect(err)
}

// stateName renders an enum value the way CloudStack users know it:
// STORE_STATE_PREPARE_FOR_MAINTENANCE -> PrepareForMaintenance.
func stateName(e protoreflect.Enum) string {
	desc := e.Descriptor()
	name := string(desc.Values().ByNumber(e.Number()).Name())
	prefix := upperSnake(string(desc.Name())) + "_"
	name = strings.TrimPrefix(name, prefix)
	var b strings.Builder
	for _, word := range strings.Split(strings.ToLower(name), "_") {
		if word == "" {
			continue
		}
		r := []rune(word)
		r[0] = unicode.ToUpper(r[0])
		b.WriteString(string(r))
	}
	return b.String()
}

func upperSnake(camel string) string {
	var b strings.Builder
	for i, r := range camel {
		if unicode.IsUpper(r) && i > 0 {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToUpper(r))
	}
	return b.String()
}
