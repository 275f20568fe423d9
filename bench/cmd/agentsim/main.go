// Command agentsim is a simulator of many Stowage agents for
// bench/scale.sh: each simulated host is a real agent RPC client of one
// controller. It enrols with its own join token (agent.Enrol: the CA
// checked against the controller's ca.crt, a key pair in its own state
// directory), serves AgentService on its own loopback TLS listener with
// its certificate (the controller accepts only the certificate naming the
// host), registers, and heartbeats at the interval the controller gives,
// reporting the stores the controller assigned it. It does no hypervisor
// work: tasks are answered from a small in-memory model (model.go).
//
// It then measures, in order, each phase bounded by its duration:
//
//	steady     every host heartbeats at the controller's interval: heartbeat
//	           latency, and the controller's CPU (% of one core, from
//	           /proc/PID/stat) and RSS
//	saturate   -workers goroutines send heartbeats of the simulated hosts
//	           back to back: heartbeats/s and their latency
//	api        through the public API while the hosts keep heartbeating:
//	           ListVolumes first page, a filtered ListVolumes, and dry-run
//	           volume creates (store and host choice among the hosts)
//
// and prints one TSV row per figure on stdout: name, unit, count, value,
// p50, p99, max, note.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

type config struct {
	controller, dataDir, stateDir string
	hosts, zones, joinWorkers     int
	pid                           int
	steady, saturate, apiFor      time.Duration
	workers, apiN                 int
}

func main() {
	var c config
	flag.StringVar(&c.controller, "controller", "https://127.0.0.1:8470", "controller URL")
	flag.StringVar(&c.dataDir, "controller-data-dir", "", "the controller's --data-dir: admin.token and pki/ca.crt are read from it")
	flag.StringVar(&c.stateDir, "state-dir", "", "directory for the simulated hosts' key pairs (one subdirectory each)")
	flag.IntVar(&c.hosts, "hosts", 1000, "simulated hosts (ids sim-0000...)")
	flag.IntVar(&c.zones, "zones", 10, "zones the hosts are spread over (host i in z<i%zones>), as scaleseed's stores")
	flag.IntVar(&c.joinWorkers, "join-workers", 16, "hosts enrolling and registering at once")
	flag.IntVar(&c.pid, "controller-pid", 0, "the controller's process id, for CPU and RSS (0: not measured)")
	flag.DurationVar(&c.steady, "steady", 60*time.Second, "length of the steady phase")
	flag.DurationVar(&c.saturate, "saturate", 20*time.Second, "length of the saturation phase (0: none)")
	flag.IntVar(&c.workers, "workers", 64, "concurrent heartbeat senders of the saturation phase")
	flag.IntVar(&c.apiN, "api-n", 200, "calls of each API measurement")
	flag.DurationVar(&c.apiFor, "api-max", 60*time.Second, "bound of each API measurement")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if c.dataDir == "" || c.stateDir == "" {
		fmt.Fprintln(os.Stderr, "agentsim: -controller-data-dir and -state-dir are required")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, c, log); err != nil {
		fmt.Fprintln(os.Stderr, "agentsim:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, c config, log *slog.Logger) error {
	tok, err := os.ReadFile(filepath.Join(c.dataDir, "admin.token"))
	if err != nil {
		return fmt.Errorf("admin token: %w", err)
	}
	api, err := newAPI(c.controller, filepath.Join(c.dataDir, "pki", "ca.crt"), strings.TrimSpace(string(tok)))
	if err != nil {
		return err
	}
	sim := &fleet{cfg: c, log: log}
	t0 := time.Now()
	if err := sim.start(ctx, api); err != nil {
		return err
	}
	emit("join_register", "s", c.hosts, time.Since(t0).Seconds(), nil, fmt.Sprintf("%d hosts enrolled (mTLS), listening and registered", c.hosts))
	beats, cancelBeats := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); sim.heartbeat(beats) }()
	defer func() { cancelBeats(); wg.Wait(); sim.close() }()

	// Steady: the hosts at the controller's interval; the first interval
	// (everyone's first beat carries new capabilities) is not measured.
	if !sleep(ctx, sim.interval+time.Second) {
		return ctx.Err()
	}
	sim.lat.reset()
	cpu0, at0 := procCPU(c.pid), time.Now()
	if !sleep(ctx, c.steady) {
		return ctx.Err()
	}
	cpu1, at1 := procCPU(c.pid), time.Now()
	d := sim.lat.take()
	secs := at1.Sub(at0).Seconds()
	emit("heartbeat_steady", "beats/s", len(d), float64(len(d))/secs, d, fmt.Sprintf("%d hosts every %s", c.hosts, sim.interval))
	if c.pid > 0 {
		emitValue("controller_cpu_steady", "% of one core", 100*(cpu1-cpu0)/secs, fmt.Sprintf("over %.0f s of steady heartbeats", secs))
		emitValue("controller_rss_steady", "MiB", procRSSMiB(c.pid), "")
	}
	if c.saturate > 0 {
		n, d, secs := sim.saturate(ctx, c.workers, c.saturate)
		emit("heartbeat_saturation", "beats/s", n, float64(n)/secs, d, fmt.Sprintf("%d senders back to back for %s, on top of the steady beats", c.workers, c.saturate))
		if c.pid > 0 {
			emitValue("controller_rss_saturation", "MiB", procRSSMiB(c.pid), "")
		}
	}
	return measureAPI(ctx, api, c)
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
