package main

// How a followed job's progress is shown: a bar on a terminal (the
// progressReporter of copy.go), one line or one protojson object per update
// elsewhere.

import (
	"fmt"
	"io"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/stowage/stowage/datapath/stream"
	stowagev1 "github.com/stowage/stowage/proto/gen/stowage/v1"
)

// jobProgress shows a job's updates: one protojson line per update with
// asJSON, else a bar when tty, else one line per update when lines, else
// nothing (--wait on a pipe).
type jobProgress struct {
	w      io.Writer
	tty    bool
	lines  bool
	asJSON bool
	bar    *progressReporter
	what   string
	total  int64
}

func (p *jobProgress) update(j *stowagev1.Job) {
	pr := j.GetProgress()
	switch {
	case p.asJSON:
		b, err := protojson.Marshal(j)
		if err == nil {
			fmt.Fprintln(p.w, string(b))
		}
	case p.tty && jobEnded(j):
		p.close()
	case p.tty:
		what := strings.TrimSpace(j.GetKind() + " " + pr.GetPhase())
		total := pr.GetBytesTotal()
		if total <= 0 {
			total = -1
		}
		if p.bar == nil || what != p.what || total != p.total {
			p.close()
			p.bar, p.what, p.total = newProgressReporter(p.w, what, total, false), what, total
		}
		if p.bar != nil {
			p.bar.update(stream.Progress{Done: pr.GetBytesDone(), Total: pr.GetBytesTotal(), BytesPerS: pr.GetBytesPerSecond()})
		}
	case p.lines:
		fmt.Fprintln(p.w, jobLine(j))
	}
}

func (p *jobProgress) close() {
	if p.bar != nil {
		p.bar.close()
		p.bar = nil
	}
}

// jobLine is one line of `job watch` on a pipe.
func jobLine(j *stowagev1.Job) string {
	parts := []string{enumName(j.GetState()), orDash(j.GetProgress().GetPhase()), progressString(j.GetProgress(), true)}
	if j.GetError() != "" {
		parts = append(parts, "error: "+j.GetError())
	}
	return strings.Join(parts, "  ")
}

// progressString is "1.0 GiB / 4.0 GiB (25%)", with ", 100.0 MiB/s" when
// rate is set; "-" before anything moved.
func progressString(p *stowagev1.JobProgress, rate bool) string {
	done, total := p.GetBytesDone(), p.GetBytesTotal()
	var s string
	switch {
	case total > 0:
		s = fmt.Sprintf("%s / %s (%.0f%%)", humanBytes(done), humanBytes(total), float64(done)*100/float64(total))
	case done > 0:
		s = humanBytes(done)
	default:
		return "-"
	}
	if rate && p.GetBytesPerSecond() > 0 {
		s += fmt.Sprintf(", %s/s", humanBytes(int64(p.GetBytesPerSecond())))
	}
	return s
}
