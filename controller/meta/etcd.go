package meta

// This is the only file of Stowage that talks to etcd's key-value API. It
// implements the kvStore seam (kv.go) as a software transactional memory
// over etcd transactions, with the same key layout as Badger under a prefix.

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/stowage/stowage/errdefs"
)

// EtcdOptions are the client settings of the etcd backend, as etcd's own
// clients take them. Files are read at Open.
type EtcdOptions struct {
	CACert       string        // PEM CA bundle the members' certificates chain to (enables TLS)
	Cert, Key    string        // client certificate and key (mutual TLS)
	Username     string        // etcd user (auth enabled on the cluster)
	PasswordFile string        // file holding the user's password (never a flag value: it would show in ps)
	DialTimeout  time.Duration // 0: 5s
	// MaxTxnOps is the cluster's --max-txn-ops (etcd's default 128): the
	// most compares and the most writes one transaction may carry.
	MaxTxnOps int
}

// WithEtcd sets the client options used when Open is given an etcd://
// spec.
func WithEtcd(e EtcdOptions) Option { return func(o *options) { o.etcd = e } }

// etcdStore is the kvStore on an etcd cluster. Every key of the layout is
// stored under prefix+"/kv/"; the leader election (leader.go) lives under
// prefix+"/leader"; prefix+"/commit" is rewritten by every write
// transaction (see commit).
type etcdStore struct {
	cli    *clientv3.Client
	data   string // prefix + "/kv/"
	marker string // prefix + "/commit"
	root   string // prefix
	maxOps int
	// fence, when set, is the leader key this process holds: every write
	// commits only while that key still exists with that create revision,
	// so a deposed leader cannot write after its successor started.
	fence atomic.Pointer[etcdFence]
}

type etcdFence struct {
	key string
	rev int64
}

var _ kvStore = (*etcdStore)(nil)

// errNotLeader is returned by a fenced commit once the fence key is gone.
var errNotLeader = errors.New("meta: this controller is no longer the leader")

// parseEtcdSpec splits etcd://h1:2379,h2:2379/prefix into endpoints and the
// key prefix ("/stowage" when the path is empty).
func parseEtcdSpec(spec string) (endpoints []string, prefix string, err error) {
	u, err := url.Parse(spec)
	if err != nil || u.Scheme != "etcd" || u.Host == "" {
		return nil, "", fmt.Errorf("meta: %q: want etcd://host:port[,host:port...]/prefix: %w", spec, errdefs.ErrInvalid)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, "", fmt.Errorf("meta: %q: credentials and options go in the etcd flags, not the URL: %w", redactSpec(spec), errdefs.ErrInvalid)
	}
	for _, h := range strings.Split(u.Host, ",") {
		if h == "" || !strings.Contains(h, ":") {
			return nil, "", fmt.Errorf("meta: %q: endpoint %q needs host:port: %w", spec, h, errdefs.ErrInvalid)
		}
		endpoints = append(endpoints, h)
	}
	prefix = strings.TrimRight(u.Path, "/")
	if prefix == "" {
		prefix = "/stowage"
	}
	return endpoints, prefix, nil
}

// redactSpec drops anything after the host list's user info, for errors.
func redactSpec(spec string) string {
	if u, err := url.Parse(spec); err == nil {
		u.User = nil
		u.RawQuery = ""
		return u.String()
	}
	return "etcd://…"
}

// openEtcd connects to the cluster named by spec and checks it answers.
func openEtcd(ctx context.Context, spec string, o EtcdOptions) (*etcdStore, error) {
	endpoints, prefix, err := parseEtcdSpec(spec)
	if err != nil {
		return nil, err
	}
	cfg := clientv3.Config{
		DialTimeout:          o.DialTimeout,
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		Logger:               zap.NewNop(),
		Context:              context.WithoutCancel(ctx),
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	scheme := "http://"
	if o.CACert != "" || o.Cert != "" {
		tc, err := etcdTLS(o)
		if err != nil {
			return nil, err
		}
		cfg.TLS, scheme = tc, "https://"
	}
	for _, e := range endpoints {
		cfg.Endpoints = append(cfg.Endpoints, scheme+e)
	}
	if o.Username != "" {
		pw, err := os.ReadFile(o.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("meta: etcd password file: %w", err)
		}
		cfg.Username, cfg.Password = o.Username, strings.TrimRight(string(pw), "\r\n")
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("meta: etcd client: %w", etcdErr(err))
	}
	s := &etcdStore{cli: cli, root: prefix, data: prefix + "/kv/", marker: prefix + "/commit", maxOps: o.MaxTxnOps}
	if s.maxOps <= 0 {
		s.maxOps = 128
	}
	// One linearizable read proves the cluster has a quorum and takes our
	// credentials.
	probe, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer cancel()
	if _, err := cli.Get(probe, s.marker); err != nil {
		_ = cli.Close()
		return nil, fmt.Errorf("meta: etcd %s: %w", strings.Join(endpoints, ","), etcdErr(err))
	}
	return s, nil
}

func etcdTLS(o EtcdOptions) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.CACert != "" {
		pem, err := os.ReadFile(o.CACert)
		if err != nil {
			return nil, fmt.Errorf("meta: etcd CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("meta: etcd CA %s holds no PEM certificate: %w", o.CACert, errdefs.ErrInvalid)
		}
		tc.RootCAs = pool
	}
	if o.Cert != "" || o.Key != "" {
		c, err := tls.LoadX509KeyPair(o.Cert, o.Key)
		if err != nil {
			return nil, fmt.Errorf("meta: etcd client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{c}
	}
	return tc, nil
}

// etcdErr classifies a client error: what a retry later may cure is
// unavailable; a refused credential is unauthenticated.
func etcdErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, rpctypes.ErrAuthFailed), errors.Is(err, rpctypes.ErrInvalidAuthToken),
		errors.Is(err, rpctypes.ErrUserEmpty):
		return fmt.Errorf("%w: %w", errdefs.ErrUnauthenticated, err)
	case errors.Is(err, rpctypes.ErrPermissionDenied):
		return fmt.Errorf("%w: the etcd user may not use this prefix: %w", errdefs.ErrPermissionDenied, err)
	case errors.Is(err, context.Canceled):
		return err
	default:
		return fmt.Errorf("%w: %w", errdefs.ErrUnavailable, err)
	}
}

func (s *etcdStore) close() error { return s.cli.Close() }

func (s *etcdStore) view(ctx context.Context, fn func(kvTxn) error) error {
	return fn(&etcdTxn{s: s, ctx: ctx})
}

func (s *etcdStore) update(ctx context.Context, fn func(kvTxn) error) error {
	t := &etcdTxn{s: s, ctx: ctx, writable: true, reads: map[string]int64{}, writes: map[string][]byte{}}
	if err := fn(t); err != nil {
		return err
	}
	return t.commit()
}

// etcdTxn reads at one revision of the cluster (the first read's) and
// buffers its writes; commit sends them in one etcd transaction that
// applies only if nothing it read has changed since.
type etcdTxn struct {
	s        *etcdStore
	ctx      context.Context
	writable bool
	rev      int64 // read revision; 0 before the first read

	reads  map[string]int64  // key -> mod revision seen (0: absent)
	ranges [][2]string       // scanned [start, end) ranges
	writes map[string][]byte // pending writes; a nil value is a delete
	cache  map[string][]byte // values read (nil: absent), per key
}

// tombstone marks a pending delete in writes.
var tombstone []byte = nil

func (t *etcdTxn) opts(o ...clientv3.OpOption) []clientv3.OpOption {
	if t.rev > 0 {
		o = append(o, clientv3.WithRev(t.rev))
	}
	return o
}

// pin records the revision of the first read.
func (t *etcdTxn) pin(h int64) {
	if t.rev == 0 {
		t.rev = h
	}
}

func (t *etcdTxn) get(key []byte) ([]byte, error) {
	k := string(key)
	if v, ok := t.writes[k]; ok {
		if v == nil {
			return nil, errKeyNotFound
		}
		return bytes.Clone(v), nil
	}
	if v, ok := t.cache[k]; ok {
		if v == nil {
			return nil, errKeyNotFound
		}
		return bytes.Clone(v), nil
	}
	resp, err := t.s.cli.Get(t.ctx, t.s.data+k, t.opts()...)
	if err != nil {
		return nil, t.readErr(err)
	}
	t.pin(resp.Header.Revision)
	var val []byte
	var mod int64
	if len(resp.Kvs) == 1 {
		val, mod = resp.Kvs[0].Value, resp.Kvs[0].ModRevision
		if val == nil {
			val = []byte{}
		}
	}
	if t.writable {
		t.reads[k] = mod
	}
	if t.cache == nil {
		t.cache = map[string][]byte{}
	}
	t.cache[k] = val
	if val == nil {
		return nil, errKeyNotFound
	}
	return bytes.Clone(val), nil
}

// prefetch reads keys in as few etcd requests as the cluster allows (one
// transaction of gets, at the read revision), into the cache get serves.
func (t *etcdTxn) prefetch(keys [][]byte) error {
	var todo []string
	for _, key := range keys {
		k := string(key)
		if _, ok := t.writes[k]; ok {
			continue
		}
		if _, ok := t.cache[k]; ok {
			continue
		}
		todo = append(todo, k)
	}
	for len(todo) > 0 {
		n := min(len(todo), t.s.maxOps)
		ops := make([]clientv3.Op, n)
		for i, k := range todo[:n] {
			ops[i] = clientv3.OpGet(t.s.data+k, t.opts()...)
		}
		resp, err := t.s.cli.Txn(t.ctx).Then(ops...).Commit()
		if err != nil {
			return t.readErr(err)
		}
		t.pin(resp.Header.Revision)
		if t.cache == nil {
			t.cache = map[string][]byte{}
		}
		for i, k := range todo[:n] {
			var val []byte
			var mod int64
			if kvs := resp.Responses[i].GetResponseRange().GetKvs(); len(kvs) == 1 {
				val, mod = kvs[0].Value, kvs[0].ModRevision
				if val == nil {
					val = []byte{}
				}
			}
			if t.writable {
				t.reads[k] = mod
			}
			t.cache[k] = val
		}
		todo = todo[n:]
	}
	return nil
}

// readErr maps a read failure: a compacted read revision means the
// transaction ran too long; a read-write one is retried on fresh data.
func (t *etcdTxn) readErr(err error) error {
	if errors.Is(err, rpctypes.ErrCompacted) {
		if t.writable {
			return errTxnConflict
		}
		return fmt.Errorf("meta: etcd compacted the revision this read started at; read again: %w: %w", errdefs.ErrAborted, err)
	}
	return fmt.Errorf("meta: etcd read: %w", etcdErr(err))
}

func (t *etcdTxn) set(key, val []byte) error {
	if !t.writable {
		return fmt.Errorf("meta: write in a read-only etcd transaction: %w", errdefs.ErrInvalid)
	}
	if val == nil {
		val = []byte{}
	}
	t.writes[string(key)] = bytes.Clone(val)
	return nil
}

func (t *etcdTxn) delete(key []byte) error {
	if !t.writable {
		return fmt.Errorf("meta: write in a read-only etcd transaction: %w", errdefs.ErrInvalid)
	}
	t.writes[string(key)] = tombstone
	return nil
}

// scanBatch is how many keys one range request of a scan fetches.
const scanBatch = 512

func (t *etcdTxn) scan(prefix, seek []byte, keysOnly bool, fn func(key, val []byte) error) error {
	start := string(prefix)
	if bytes.Compare(seek, prefix) > 0 {
		start = string(seek)
	}
	end := prefixEnd(t.s.data + string(prefix))
	// The pending writes inside the range, in key order, merged with what
	// the cluster holds.
	var pend []string
	for k := range t.writes {
		if strings.HasPrefix(k, string(prefix)) && k >= start {
			pend = append(pend, k)
		}
	}
	slices.Sort(pend)
	from := t.s.data + start
	// The scan read everything in [start, covered], or to the range's end
	// when complete: that is the range the commit guards.
	covered, complete := start, false
	defer func() {
		if !t.writable {
			return
		}
		rend := t.s.data + covered + "\x00"
		if complete {
			rend = end
		}
		t.ranges = append(t.ranges, [2]string{t.s.data + start, rend})
	}()
	emit := func(k string, v []byte) error {
		covered = k
		if keysOnly {
			v = nil
		} else if v == nil {
			v = []byte{}
		}
		return fn([]byte(k), v)
	}
	flushPending := func(upTo string, incl bool) error {
		for len(pend) > 0 && (pend[0] < upTo || (incl && pend[0] == upTo)) {
			k := pend[0]
			pend = pend[1:]
			if v := t.writes[k]; v != nil {
				if err := emit(k, v); err != nil {
					return err
				}
			}
		}
		return nil
	}
	for {
		o := t.opts(clientv3.WithRange(end), clientv3.WithLimit(scanBatch), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
		if keysOnly {
			o = append(o, clientv3.WithKeysOnly())
		}
		resp, err := t.s.cli.Get(t.ctx, from, o...)
		if err != nil {
			return t.readErr(err)
		}
		t.pin(resp.Header.Revision)
		for _, kv := range resp.Kvs {
			k := string(kv.Key[len(t.s.data):])
			if err := flushPending(k, false); err != nil {
				return stopped(err)
			}
			if t.writable {
				t.reads[k] = kv.ModRevision
			}
			if _, mine := t.writes[k]; mine {
				// Our own write (or delete) of k replaces what is stored.
				pend = slices.DeleteFunc(pend, func(p string) bool { return p == k })
				if v := t.writes[k]; v != nil {
					if err := emit(k, v); err != nil {
						return stopped(err)
					}
				}
				continue
			}
			if err := emit(k, kv.Value); err != nil {
				return stopped(err)
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	if err := flushPending(string([]byte{0xff}), true); err != nil {
		return stopped(err)
	}
	complete = true
	return nil
}

// stopped turns errStopScan into the end of the scan.
func stopped(err error) error {
	if errors.Is(err, errStopScan) {
		return nil
	}
	return err
}

// prefixEnd is the smallest key greater than every key starting with p.
func prefixEnd(p string) string {
	b := []byte(p)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] < 0xff {
			b[i]++
			return string(b[:i+1])
		}
	}
	return "\x00" // every key: etcd's "from key" end
}

// commit sends the buffered writes in one etcd transaction, guarded by:
//   - each key read still at the revision it was read at (a delete shows
//     as revision 0, so a record that vanished fails the guard too);
//   - no key inside a scanned range written after the read revision (a
//     record inserted where the transaction looked);
//   - the leader fence, when this process leads.
//
// When those guards exceed the cluster's --max-txn-ops, they are replaced
// by one coarser guard: prefix+"/commit", rewritten by every write
// transaction, unchanged since the read revision. That is correct and
// only less concurrent.
func (t *etcdTxn) commit() error {
	if len(t.writes) == 0 {
		return nil
	}
	if len(t.writes)+1 > t.s.maxOps {
		return fmt.Errorf("meta: one transaction writes %d keys, more than etcd allows (--max-txn-ops %d): %w",
			len(t.writes), t.s.maxOps, errdefs.ErrResourceExhausted)
	}
	var cmps []clientv3.Cmp
	f := t.s.fence.Load()
	if f != nil {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(f.key), "=", f.rev))
	}
	if t.rev > 0 {
		fine := make([]clientv3.Cmp, 0, len(t.reads)+len(t.ranges))
		for k, mod := range t.reads {
			fine = append(fine, clientv3.Compare(clientv3.ModRevision(t.s.data+k), "=", mod))
		}
		for _, r := range t.ranges {
			fine = append(fine, clientv3.Compare(clientv3.ModRevision(r[0]), "<", t.rev+1).WithRange(r[1]))
		}
		if len(cmps)+len(fine) <= t.s.maxOps {
			cmps = append(cmps, fine...)
		} else {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(t.s.marker), "<", t.rev+1))
		}
	}
	ops := make([]clientv3.Op, 0, len(t.writes)+1)
	for k, v := range t.writes {
		if v == nil {
			ops = append(ops, clientv3.OpDelete(t.s.data+k))
		} else {
			ops = append(ops, clientv3.OpPut(t.s.data+k, string(v)))
		}
	}
	ops = append(ops, clientv3.OpPut(t.s.marker, ""))
	txn := t.s.cli.Txn(t.ctx).If(cmps...).Then(ops...)
	if f != nil {
		txn = txn.Else(clientv3.OpGet(f.key))
	}
	resp, err := txn.Commit()
	if err != nil {
		// The outcome is unknown (the request may have been applied): as
		// after a crash at commit, the workflows' recovery sorts it out.
		return fmt.Errorf("meta: etcd commit: %w", etcdErr(err))
	}
	if resp.Succeeded {
		return nil
	}
	if f != nil && len(resp.Responses) == 1 {
		kvs := resp.Responses[0].GetResponseRange().GetKvs()
		if len(kvs) == 0 || kvs[0].CreateRevision != f.rev {
			return fmt.Errorf("%w: %w", errdefs.ErrUnavailable, errNotLeader)
		}
	}
	return errTxnConflict
}

// watch runs an etcd watch of key in a goroutine. notify is called once the
// watch is in place (a change between the caller's read and then would
// otherwise be missed), after every change, and again after the stream is
// re-established when it broke (member lost, compaction).
func (s *etcdStore) watch(ctx context.Context, key []byte, notify func()) {
	go func() {
		for ctx.Err() == nil {
			wch := s.cli.Watch(clientv3.WithRequireLeader(ctx), s.data+string(key), clientv3.WithCreatedNotify())
			for r := range wch {
				if r.Created || len(r.Events) > 0 {
					notify()
				}
				if r.Canceled {
					break
				}
			}
			t := time.NewTimer(500 * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
			case <-t.C:
			}
		}
	}()
}

// setFence makes every later commit conditional on key existing with
// create revision rev.
func (s *etcdStore) setFence(key string, rev int64) {
	s.fence.Store(&etcdFence{key: key, rev: rev})
}
