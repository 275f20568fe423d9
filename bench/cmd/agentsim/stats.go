package main

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// latencies collects durations from many goroutines.
type latencies struct {
	mu     sync.Mutex
	d      []time.Duration
	failed int
}

func (l *latencies) add(d time.Duration) { l.mu.Lock(); l.d = append(l.d, d); l.mu.Unlock() }
func (l *latencies) fail()               { l.mu.Lock(); l.failed++; l.mu.Unlock() }
func (l *latencies) reset()              { l.mu.Lock(); l.d, l.failed = nil, 0; l.mu.Unlock() }

// take returns the durations collected since the last reset and resets.
func (l *latencies) take() []time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	d := l.d
	if l.failed > 0 {
		fmt.Fprintf(os.Stderr, "agentsim: %d calls failed\n", l.failed)
	}
	l.d, l.failed = nil, 0
	return d
}

// pct is the p-th percentile of d in milliseconds (nearest rank).
func pct(d []time.Duration, p float64) float64 {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(p/100*float64(len(s))+0.5) - 1
	i = max(0, min(i, len(s)-1))
	return float64(s[i].Microseconds()) / 1000
}

// emit prints one figure: name, unit, count, value, p50 ms, p99 ms, max ms, note.
func emit(name, unit string, n int, value float64, d []time.Duration, note string) {
	fmt.Printf("%s\t%s\t%d\t%.2f\t%.2f\t%.2f\t%.2f\t%s\n", name, unit, n, value, pct(d, 50), pct(d, 99), pct(d, 100), note)
}

func emitValue(name, unit string, value float64, note string) {
	fmt.Printf("%s\t%s\t1\t%.2f\t\t\t\t%s\n", name, unit, value, note)
}

// procCPU is the CPU seconds (user + system) process pid has used.
func procCPU(pid int) float64 {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command (in parentheses, which may hold spaces).
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ is 100 on Linux
}

// procRSSMiB is the resident set of process pid in MiB.
func procRSSMiB(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024
		}
	}
	return 0
}
