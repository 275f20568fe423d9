package agent

import (
	"sort"

	"github.com/stowage/stowage/datapath/stream"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// copyEngineCounters are the copy engine's counters of this process, as
// the heartbeat carries them (the controller exports them for the host).
func copyEngineCounters() *stowagev1.CopyEngineCounters {
	t := stream.ReadTotals()
	c := &stowagev1.CopyEngineCounters{Bytes: t.Bytes, ReadRetries: t.ReadRetries}
	for k, n := range t.Copies {
		c.Copies = append(c.Copies, &stowagev1.CopyCount{Method: k.Method, Result: k.Result, Count: n})
	}
	sort.Slice(c.Copies, func(i, j int) bool {
		a, b := c.Copies[i], c.Copies[j]
		return a.Method < b.Method || a.Method == b.Method && a.Result < b.Result
	})
	return c
}
