package nbd

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/stowage/stowage/datapath/stream"
	"github.com/stowage/stowage/errdefs"
)

// UpstreamBackend serves an export from another NBD server: every request
// is forwarded through a Client (several connections when the upstream
// allows it). The agent puts it in front of a qemu-storage-daemon that
// serves a qcow2 chain on a unix socket, so that the chain is exported
// under the same export names, TLS, expiry and connection limits as a raw
// file.
//
// The upstream may go away and come back (a supervised daemon restarted):
// a request that fails with errdefs.ErrUnavailable (the connection broke)
// dials again, for up to RedialTimeout, and is sent once more. Every
// forwarded request is idempotent (read, write at an offset, zero, trim,
// flush), so a request that reached the old daemon before it died is
// harmless to repeat; writes it had acknowledged without a flush may be
// lost with it, as NBD allows.
type UpstreamBackend struct {
	dial func(ctx context.Context) (*Client, error)
	size int64
	ro   bool
	life context.Context
	stop context.CancelFunc

	mu  sync.Mutex
	c   *Client
	gen uint64
}

// RedialTimeout bounds how long a request waits for the upstream to answer
// again after its connections broke.
var RedialTimeout = 15 * time.Second

var (
	_ Backend         = (*UpstreamBackend)(nil)
	_ Zeroer          = (*UpstreamBackend)(nil)
	_ Trimmer         = (*UpstreamBackend)(nil)
	_ Extenter        = (*UpstreamBackend)(nil)
	_ FUAWriter       = (*UpstreamBackend)(nil)
	_ SkipHolesOnRead = (*UpstreamBackend)(nil)
)

// NewUpstreamBackend dials the upstream once (dial opens a Client) and
// returns a backend of its size; dial is called again whenever the
// connections break. Close closes the client.
func NewUpstreamBackend(ctx context.Context, dial func(ctx context.Context) (*Client, error)) (*UpstreamBackend, error) {
	c, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	life, stop := context.WithCancel(context.WithoutCancel(ctx))
	return &UpstreamBackend{dial: dial, size: c.Size(), ro: c.ReadOnly(), c: c, life: life, stop: stop}, nil
}

// Size is the upstream export's size when it was first dialled.
func (b *UpstreamBackend) Size() int64 { return b.size }

// ReadOnly says the upstream refuses writes.
func (b *UpstreamBackend) ReadOnly() bool { return b.ro }

// Client is the current upstream client.
func (b *UpstreamBackend) Client() *Client {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.c
}

// SkipHolesOnRead implements SkipHolesOnRead: a hole lookup before each
// read would be one more round trip to the upstream.
func (b *UpstreamBackend) SkipHolesOnRead() bool { return true }

func (b *UpstreamBackend) current() (*Client, uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.c, b.gen
}

// redial replaces the client of generation gen (unless another request
// already did) and returns the new one.
func (b *UpstreamBackend) redial(ctx context.Context, gen uint64) (*Client, uint64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.gen != gen {
		return b.c, b.gen, nil
	}
	ctx, cancel := context.WithTimeout(ctx, RedialTimeout)
	defer cancel()
	var last error
	for delay := 20 * time.Millisecond; ; delay = min(2*delay, time.Second) {
		c, err := b.dial(ctx)
		if err == nil {
			if c.Size() != b.size {
				c.Close()
				return nil, gen, fmt.Errorf("nbd upstream: size changed from %d to %d on reconnect: %w", b.size, c.Size(), errdefs.ErrDataLoss)
			}
			old := b.c
			b.c, b.gen = c, b.gen+1
			go old.Close()
			return c, b.gen, nil
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, gen, fmt.Errorf("nbd upstream: not answering again within %s: %w", RedialTimeout, errors.Join(last, errdefs.ErrUnavailable))
		case <-time.After(delay):
		}
	}
}

// do runs op on the current client, once more on a new one if the
// connections broke.
func (b *UpstreamBackend) do(ctx context.Context, op func(c *Client) error) error {
	c, gen := b.current()
	err := op(c)
	if err == nil || !errdefs.IsUnavailable(err) || ctx.Err() != nil || b.life.Err() != nil {
		return err
	}
	c, _, rerr := b.redial(ctx, gen)
	if rerr != nil {
		return errors.Join(err, rerr)
	}
	return op(c)
}

// ReadAt forwards a read.
func (b *UpstreamBackend) ReadAt(p []byte, off int64) (int, error) {
	err := b.do(b.life, func(c *Client) error {
		_, err := c.ReadAtContext(b.life, p, off)
		return err
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt forwards a write.
func (b *UpstreamBackend) WriteAt(p []byte, off int64) (int, error) {
	return b.write(p, off, false)
}

// WriteAtFUA forwards a write with NBD_CMD_FLAG_FUA.
func (b *UpstreamBackend) WriteAtFUA(p []byte, off int64) (int, error) {
	return b.write(p, off, true)
}

func (b *UpstreamBackend) write(p []byte, off int64, fua bool) (int, error) {
	err := b.do(b.life, func(c *Client) error {
		_, err := c.WriteAtContext(b.life, p, off, fua)
		return err
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Sync forwards a flush.
func (b *UpstreamBackend) Sync() error {
	return b.do(b.life, func(c *Client) error { return c.Flush(b.life) })
}

// ZeroRange forwards NBD_CMD_WRITE_ZEROES (NO_HOLE unless punch).
func (b *UpstreamBackend) ZeroRange(off, n int64, punch bool) error {
	return b.do(b.life, func(c *Client) error { return c.Zero(b.life, off, n, ZeroOptions{NoHole: !punch}) })
}

// Trim forwards NBD_CMD_TRIM.
func (b *UpstreamBackend) Trim(off, n int64) error {
	return b.do(b.life, func(c *Client) error { return c.Trim(b.life, off, n) })
}

// Extents forwards NBD_CMD_BLOCK_STATUS (base:allocation), at most max
// extents.
func (b *UpstreamBackend) Extents(ctx context.Context, off, n int64, max int) ([]stream.Extent, error) {
	var out []stream.Extent
	err := b.do(ctx, func(c *Client) error {
		x, err := c.BlockStatus(ctx, off, n)
		out = x
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(out) > max {
		out = out[:max]
	}
	return out, nil
}

// Close closes the upstream client; requests in flight fail.
func (b *UpstreamBackend) Close() error {
	b.stop()
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.c.Close()
}
