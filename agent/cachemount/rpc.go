package cachemount

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/errdefs/errconnect"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
	"github.com/stowage/stowage/proto/gen/stowage/v1/stowagev1connect"
	"github.com/stowage/stowage/rpclimit"
)

// defaultHTTP bounds how long one read of a VM waits on a failing source
// before it gets EIO (two retries, a 10 s stall limit); the next read tries
// again.
func defaultHTTP() stream.HTTPOptions {
	return stream.HTTPOptions{MaxRetries: 2, StallTimeout: 10 * time.Second}
}

// DefaultHTTP is the HTTP behaviour of the template mount's sources.
func DefaultHTTP() stream.HTTPOptions { return defaultHTTP() }

// handler serves ImageCacheService.
type handler struct{ s *Server }

var _ stowagev1connect.ImageCacheServiceHandler = handler{}

func (h handler) SyncCache(ctx context.Context, req *connect.Request[stowagev1.SyncCacheRequest]) (*connect.Response[stowagev1.SyncCacheResponse], error) {
	st, err := h.s.Sync(ctx, req.Msg.GetTemplates())
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&stowagev1.SyncCacheResponse{Cache: st}), nil
}

func (h handler) GetCache(ctx context.Context, _ *connect.Request[stowagev1.GetCacheRequest]) (*connect.Response[stowagev1.GetCacheResponse], error) {
	return connect.NewResponse(&stowagev1.GetCacheResponse{Cache: h.s.Status()}), nil
}

// Serve serves ImageCacheService on the unix socket path (mode 0600,
// replacing a socket left by an earlier life) until ctx ends, every request
// bounded by lim.
func (s *Server) Serve(ctx context.Context, path string, lim rpclimit.Limits) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("control socket %s: %w", path, errors.Join(err, errdefs.ErrUnavailable))
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		_ = os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("control socket %s: %w", path, errors.Join(err, errdefs.ErrUnavailable))
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return fmt.Errorf("control socket %s: %w", path, errors.Join(err, errdefs.ErrUnavailable))
	}
	mux := http.NewServeMux()
	mux.Handle(stowagev1connect.NewImageCacheServiceHandler(handler{s}, lim.HandlerOptions(), connect.WithInterceptors(errconnect.Interceptor())))
	srv := rpclimit.NewServer(lim.Wrap(mux), nil)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	return nil
}

// Client calls a template mount's ImageCacheService over its unix socket.
type Client struct {
	c    stowagev1connect.ImageCacheServiceClient
	path string
}

// NewClient returns a client of the socket at path; it connects per call.
func NewClient(path string) *Client {
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConns: 2,
	}}
	return &Client{c: stowagev1connect.NewImageCacheServiceClient(hc, "http://stowage-cache", connect.WithInterceptors(errconnect.Interceptor())), path: path}
}

// SyncCache sends the desired templates and returns the mount's status.
func (c *Client) SyncCache(ctx context.Context, specs []*stowagev1.CacheSpec) (*stowagev1.CacheStatus, error) {
	resp, err := c.c.SyncCache(ctx, connect.NewRequest(&stowagev1.SyncCacheRequest{Templates: specs}))
	if err != nil {
		return nil, fmt.Errorf("template mount %s: sync: %w", c.path, errconnect.FromConnect(err))
	}
	return resp.Msg.GetCache(), nil
}

// GetCache returns the mount's status.
func (c *Client) GetCache(ctx context.Context) (*stowagev1.CacheStatus, error) {
	resp, err := c.c.GetCache(ctx, connect.NewRequest(&stowagev1.GetCacheRequest{}))
	if err != nil {
		return nil, fmt.Errorf("template mount %s: %w", c.path, errconnect.FromConnect(err))
	}
	return resp.Msg.GetCache(), nil
}
