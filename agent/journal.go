package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/stowage/stowage/errdefs"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// journal keeps the result of every finished task under dir/<task-id>.pb so
// that a task retried by the controller (after a lost reply or a controller
// restart) returns its first result instead of running twice. Entries are
// written temp+fsync+rename and expire after retain.
type journal struct {
	dir    string
	retain time.Duration

	mu      sync.Mutex
	running map[string]chan struct{} // task id -> closed when it finishes
}

var taskIDPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

func openJournal(dir string, retain time.Duration) (*journal, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("task journal %s: %w", dir, err)
	}
	j := &journal{dir: dir, retain: retain, running: map[string]chan struct{}{}}
	j.expire()
	return j, nil
}

func (j *journal) path(id string) string { return filepath.Join(j.dir, id+".pb") }

// get returns the journalled result of id, or ErrNotFound.
func (j *journal) get(id string) (*stowagev1.TaskResult, error) {
	if !taskIDPattern.MatchString(id) {
		return nil, fmt.Errorf("task id %q: %w", id, errdefs.ErrInvalid)
	}
	b, err := os.ReadFile(j.path(id))
	if os.IsNotExist(err) {
		return nil, fmt.Errorf("task %s: no journalled result: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("task %s: read journal: %w", id, err)
	}
	res := &stowagev1.TaskResult{}
	if err := proto.Unmarshal(b, res); err != nil {
		return nil, fmt.Errorf("task %s: corrupt journal entry: %w", id, errdefs.ErrDataLoss)
	}
	return res, nil
}

// run executes fn once per task id: a concurrent duplicate waits for the
// first, a later duplicate gets the journalled result. Transient failures
// (unreachable, cancelled) are not journalled, so a retry runs again.
func (j *journal) run(ctx context.Context, id string, fn func(context.Context) (*stowagev1.TaskResult, error)) (*stowagev1.TaskResult, error) {
	if !taskIDPattern.MatchString(id) {
		return nil, fmt.Errorf("task id %q: must be 1-128 of [A-Za-z0-9._-]: %w", id, errdefs.ErrInvalid)
	}
	for {
		if res, err := j.get(id); err == nil {
			return res, nil
		}
		j.mu.Lock()
		wait, busy := j.running[id]
		if !busy {
			done := make(chan struct{})
			j.running[id] = done
			j.mu.Unlock()
			defer func() {
				j.mu.Lock()
				delete(j.running, id)
				j.mu.Unlock()
				close(done)
			}()
			break
		}
		j.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-wait:
		}
	}
	res, err := fn(ctx)
	if err != nil {
		if errdefs.IsUnavailable(err) || ctx.Err() != nil {
			return nil, err
		}
		res = &stowagev1.TaskResult{ErrorClass: errdefs.ClassName(err), Error: err.Error()}
		if res.ErrorClass == "" {
			res.ErrorClass = errdefs.ErrInternal.Error()
		}
	}
	res.TaskId = id
	res.Done = true
	if err := j.put(res); err != nil {
		return nil, err
	}
	return res, nil
}

func (j *journal) put(res *stowagev1.TaskResult) error {
	b, err := proto.Marshal(res)
	if err != nil {
		return fmt.Errorf("task %s: encode result: %w", res.TaskId, err)
	}
	tmp, err := os.CreateTemp(j.dir, ".wip-*")
	if err != nil {
		return fmt.Errorf("task %s: journal: %w", res.TaskId, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), j.path(res.TaskId))
	}
	if err != nil {
		return fmt.Errorf("task %s: journal: %w", res.TaskId, err)
	}
	return nil
}

// expire removes entries older than retain and leftover temporary files.
func (j *journal) expire() {
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		return
	}
	cutoff := time.Now().Add(-j.retain)
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			continue
		}
		if info.ModTime().Before(cutoff) || (len(e.Name()) > 5 && e.Name()[:5] == ".wip-") {
			os.Remove(filepath.Join(j.dir, e.Name()))
		}
	}
}
