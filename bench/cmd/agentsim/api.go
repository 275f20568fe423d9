package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"os"
	"time"

	"connectrpc.com/connect"

	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/trust"
)

// apiClient calls the controller's public API with the admin token.
type apiClient struct {
	caFile  string
	hosts   stowagev1connect.HostServiceClient
	volumes stowagev1connect.VolumeServiceClient
	stores  stowagev1connect.StoreServiceClient
}

func newAPI(url, caFile, token string) (*apiClient, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("controller CA: %w", err)
	}
	ca, err := trust.ParseCertificate(pem)
	if err != nil {
		return nil, fmt.Errorf("controller CA %s: %w", caFile, err)
	}
	hc := &http.Client{Timeout: time.Minute, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: trust.Pool(ca)}, ForceAttemptHTTP2: true}}
	auth := connect.WithInterceptors(bearer(token))
	return &apiClient{caFile: caFile,
		hosts:   stowagev1connect.NewHostServiceClient(hc, url, auth),
		volumes: stowagev1connect.NewVolumeServiceClient(hc, url, auth),
		stores:  stowagev1connect.NewStoreServiceClient(hc, url, auth),
	}, nil
}

type bearer string

func (b bearer) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		req.Header().Set("Authorization", "Bearer "+string(b))
		return next(ctx, req)
	}
}
func (b bearer) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}
func (b bearer) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// measureAPI times the list and plan calls, each n times or until bound.
func measureAPI(ctx context.Context, api *apiClient, c config) error {
	stores, err := api.stores.ListStores(ctx, connect.NewRequest(&stowagev1.ListStoresRequest{Zone: "z1", PageSize: 1}))
	if err != nil || len(stores.Msg.GetStores()) == 0 {
		return fmt.Errorf("list stores of z1: %v (%d)", err, len(stores.Msg.GetStores()))
	}
	store := stores.Msg.GetStores()[0].GetId()
	var items int
	for _, m := range []struct {
		name, note string
		call       func() error
	}{
		{"list_volumes_first_page", "ListVolumes, no filter, default page (500)", func() error {
			r, err := api.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{}))
			items = len(r.Msg.GetVolumes())
			return err
		}},
		{"list_volumes_filtered", "ListVolumes store_id + state Ready, page of 100", func() error {
			r, err := api.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{StoreId: store,
				State: stowagev1.VolumeState_VOLUME_STATE_READY, PageSize: 100}))
			items = len(r.Msg.GetVolumes())
			return err
		}},
		{"list_volumes_by_name", "ListVolumes name = one volume's (index), default page", func() error {
			r, err := api.volumes.ListVolumes(ctx, connect.NewRequest(&stowagev1.ListVolumesRequest{Name: "vol-000042"}))
			items = len(r.Msg.GetVolumes())
			return err
		}},
		{"plan_create_dry_run", "CreateVolume blank 10 GiB in z1, dry_run: store and host choice", func() error {
			r, err := api.volumes.CreateVolume(ctx, connect.NewRequest(&stowagev1.CreateVolumeRequest{Name: "planned", Size: 10 << 30, Zone: "z1", DryRun: true}))
			items = len(r.Msg.GetPlan().GetSteps())
			return err
		}},
	} {
		var d []time.Duration
		deadline := time.Now().Add(c.apiFor)
		for i := 0; i < c.apiN && time.Now().Before(deadline); i++ {
			t0 := time.Now()
			if err := m.call(); err != nil {
				return fmt.Errorf("%s: %w", m.name, err)
			}
			d = append(d, time.Since(t0))
		}
		emit(m.name, "calls/s", len(d), float64(len(d))/sum(d), d, fmt.Sprintf("%s; %d items", m.note, items))
	}
	return nil
}

func sum(d []time.Duration) float64 {
	var s time.Duration
	for _, x := range d {
		s += x
	}
	return max(s.Seconds(), 1e-9)
}
