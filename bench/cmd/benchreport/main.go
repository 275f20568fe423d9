// Command benchreport turns the raw results of bench/run.sh and
// bench/fuse.sh (TSV rows from shared/bench/peers.sh, bench/extra.sh and
// bench/fuse.sh, all measured in one invocation) into a markdown table of
// same-run ratios, Stowage against the best peer and the target peer, and a
// PNG bar chart: copies (sections b, c, x), NBD exports (d) and the FUSE
// template cache (e: cold and warm reads against the direct read, and the
// first byte of a never-read template).
//
//	go run ./bench/cmd/benchreport -tsv peers.tsv -tsv extra.tsv -md out.md -png out.png
//
// A TSV row is: section, test, unit, median, min, max, note. The rows of our
// program start with -ours (default "stowage"). With -merge, rows of the
// same section, test and unit from several TSVs (several invocations of one
// script, each with RUNS=1, as bench/fuse.sh does) become one row: the
// median of their medians, the least minimum and the greatest maximum.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// row is one measured figure.
type row struct {
	sec, name, unit string
	median, lo, hi  float64
	ok              bool
	note            string
}

// scenario picks the rows of one comparison from the results.
type scenario struct {
	title string
	sec   string
	match func(name string) bool
	trim  func(name string) string // label in the chart
	// targets are label prefixes of the peers the issue names; the target
	// row is the best of the rows matching any of them (for a sparse copy:
	// the best of qemu-img convert with and without -W -m 8, and nbdcopy).
	targets []string
	min     float64 // required ratio against the target
	// unit of the rows (default MiB/s, higher is better); "ms" rows are
	// latencies, lower is better, with an absolute target maxMs (0: none).
	unit  string
	maxMs float64
}

func (s scenario) targetName() string {
	if len(s.targets) == 1 {
		return s.targets[0]
	}
	return "best of " + strings.Join(s.targets, ", ")
}

func (s scenario) isTarget(label string) bool {
	for _, t := range s.targets {
		if strings.HasPrefix(label, t) {
			return true
		}
	}
	return false
}

// target returns the best peer row that is a target (peers are sorted best first).
func (s scenario) target(peers []row) *row {
	for i := range peers {
		if s.isTarget(s.trim(peers[i].name)) {
			return &peers[i]
		}
	}
	return nil
}

func (s scenario) rowUnit() string {
	if s.unit == "" {
		return "MiB/s"
	}
	return s.unit
}

type tsvList []string

func (l *tsvList) String() string     { return strings.Join(*l, ",") }
func (l *tsvList) Set(s string) error { *l = append(*l, s); return nil }

func main() {
	var tsvs tsvList
	flag.Var(&tsvs, "tsv", "results TSV (repeatable)")
	md := flag.String("md", "", "markdown output (default stdout)")
	pngOut := flag.String("png", "", "PNG chart output")
	ours := flag.String("ours", "stowage", "label prefix of our program's rows")
	command := flag.String("cmd", "", "the command that produced the results, quoted in the report")
	facts := flag.String("facts", "", "file with machine facts (markdown list) to include")
	merge := flag.Bool("merge", false, "merge rows of the same section, test and unit across the TSVs (median of medians)")
	title := flag.String("title", "Copy benchmark", "report heading")
	flag.Parse()
	if len(tsvs) == 0 {
		fmt.Fprintln(os.Stderr, "benchreport: at least one -tsv is required")
		os.Exit(2)
	}
	var rows []row
	for _, p := range tsvs {
		r, err := readTSV(p)
		if err != nil {
			slog.Error("benchreport: reading results", "path", p, "err", err)
			os.Exit(1)
		}
		rows = append(rows, r...)
	}
	if *merge {
		rows = mergeRows(rows)
	}
	out := io.Writer(os.Stdout)
	if *md != "" {
		f, err := os.Create(*md)
		if err != nil {
			slog.Error("benchreport: creating report", "err", err)
			os.Exit(1)
		}
		defer f.Close()
		out = f
	}
	scen := scenarios()
	writeMarkdown(out, *title, rows, scen, *ours, *command, *facts)
	if *pngOut != "" {
		if err := writePNG(*pngOut, rows, scen, *ours); err != nil {
			slog.Error("benchreport: writing chart", "err", err)
			os.Exit(1)
		}
	}
}

func scenarios() []scenario {
	suffix := func(x string) func(string) bool { return func(n string) bool { return strings.HasSuffix(n, x) } }
	prefix := func(x string) func(string) bool { return func(n string) bool { return strings.HasPrefix(n, x) } }
	trimSuffix := func(x string) func(string) string { return func(n string) string { return strings.TrimSuffix(n, x) } }
	trimPrefix := func(x string) func(string) string { return func(n string) string { return strings.TrimPrefix(n, x) } }
	oneOf := func(names ...string) func(string) bool {
		return func(n string) bool { return slices.Contains(names, n) }
	}
	same := func(n string) string { return n }
	all := func(string) bool { return true }
	nbdcopy := []string{"nbdcopy file->file"}
	bestCopy := []string{"qemu-img convert -O raw", "qemu-img convert -W -m 8 -O raw", "nbdcopy"}
	fs := func(shape string, targets []string) scenario {
		return scenario{title: "real image (ext4 of real files), " + shape + ", cold", sec: "r", match: prefix(shape + ": "),
			trim: trimPrefix(shape + ": "), targets: targets, min: 1.0}
	}
	return append([]scenario{
		{title: "dense copy, cold source", sec: "b", match: suffix(" (cold src)"), trim: trimSuffix(" (cold src)"), targets: nbdcopy, min: 1.0},
		{title: "dense copy, warm source", sec: "b", match: suffix(" (warm src)"), trim: trimSuffix(" (warm src)"), targets: nbdcopy, min: 1.0},
		{title: "sparse copy (10% data), cold", sec: "c", match: all, trim: same, targets: bestCopy, min: 1.0},
		{title: "zero-filled dense image, cold", sec: "x", match: prefix("zero-filled: "),
			trim: trimPrefix("zero-filled: "), targets: []string{"qemu-img convert -W -m 8 -O raw"}, min: 1.0},
		fs("fs raw, sparse", bestCopy),
		fs("fs raw, dense", []string{"nbdcopy"}),
		fs("fs qcow2 -> raw", bestCopy),
		{title: "NBD raw export read, warm source (nbdcopy -> null:)", sec: "d", match: suffix(": nbdcopy -> null: (warm src)"),
			trim: trimSuffix(": nbdcopy -> null: (warm src)"), targets: []string{"nbdkit file (unix)"}, min: 1.0},
		{title: "NBD raw export read, cold source (nbdcopy -> null:)", sec: "d", match: suffix(": nbdcopy -> null: (cold src)"),
			trim: trimSuffix(": nbdcopy -> null: (cold src)"), targets: []string{"nbdkit file (unix)"}, min: 1.0},
		{title: "NBD raw export write + flush (nbdcopy file -> export)", sec: "d", match: suffix(": nbdcopy file -> export (write, flush)"),
			trim: trimSuffix(": nbdcopy file -> export (write, flush)"), targets: []string{"nbdkit file (unix)"}, min: 1.0},
		{title: "NBD qcow2 linked clone export read, warm", sec: "q", match: suffix(": nbdcopy -> null: (warm)"),
			trim: trimSuffix(": nbdcopy -> null: (warm)"), targets: []string{"qemu-nbd -f qcow2"}, min: 1.0},
		{title: "NBD qcow2 linked clone export read, cold", sec: "q", match: suffix(": nbdcopy -> null: (cold)"),
			trim: trimSuffix(": nbdcopy -> null: (cold)"), targets: []string{"qemu-nbd -f qcow2"}, min: 1.0},
		{title: "FUSE cache, local source: complete template read (warm)", sec: "e",
			match: oneOf("direct (no FUSE), warm", "stowage FUSE local, warm (complete template)"),
			trim:  same, targets: []string{"direct"}, min: 0.95},
		{title: "FUSE cache, local source: cold read of a never-fetched template", sec: "e",
			match: oneOf("direct (no FUSE), cold", "stowage FUSE local, cold"), trim: same, targets: []string{"direct"}, min: 0.8},
		{title: "FUSE cache, local source: first byte", sec: "e", match: suffix(", first byte"),
			trim: trimSuffix(", first byte"), targets: []string{"direct"}, unit: "ms", maxMs: 20},
		{title: "FUSE cache, HTTP source: cold read vs curl", sec: "h",
			match: oneOf("curl (HTTP, cold)", "stowage FUSE HTTP, cold"), trim: same, targets: []string{"curl"}, min: 0.8},
		{title: "FUSE cache, HTTP source: first byte", sec: "h", match: suffix(", first byte"),
			trim: trimSuffix(", first byte"), targets: []string{"curl"}, unit: "ms", maxMs: 20},
		// bench/api.sh: API call to the job's success, p50 and p99 of N creates
		{title: "API: create linked clone, p50", sec: "l", match: suffix("linked clone, p50"), trim: same, targets: []string{"qemu-img"}, unit: "ms", maxMs: 50},
		{title: "API: create linked clone, p99", sec: "l", match: suffix("linked clone, p99"), trim: same, targets: []string{"qemu-img"}, unit: "ms", maxMs: 50},
		{title: "API: create lazy volume, p50", sec: "l", match: suffix("lazy volume, p50"), trim: same, unit: "ms", maxMs: 50},
		{title: "API: create lazy volume, p99", sec: "l", match: suffix("lazy volume, p99"), trim: same, unit: "ms", maxMs: 50},
		{title: "API: create full copy, p50", sec: "l", match: suffix("full copy, p50"), trim: same, targets: []string{"qemu-img"}, unit: "ms"},
		{title: "API: create full copy, p99", sec: "l", match: suffix("full copy, p99"), trim: same, targets: []string{"qemu-img"}, unit: "ms"},
		{title: "API: snapshot, p50", sec: "l", match: suffix("snapshot, p50"), trim: same, unit: "ms"},
		{title: "API: snapshot, p99", sec: "l", match: suffix("snapshot, p99"), trim: same, unit: "ms"},
		{title: "API: revert, p50", sec: "l", match: suffix("revert, p50"), trim: same, unit: "ms"},
		{title: "API: revert, p99", sec: "l", match: suffix("revert, p99"), trim: same, unit: "ms"},
		{title: "dense image into an iSCSI LUN (bench/iscsi.sh)", sec: "i", match: prefix("dense into a LUN"),
			trim: func(n string) string { _, t, _ := strings.Cut(n, "): "); return t }, targets: []string{"qemu-img convert -n"}, min: 1.0},
		{title: "sparse image (10% data) into an iSCSI LUN (bench/iscsi.sh)", sec: "i", match: prefix("sparse into a LUN"),
			trim: func(n string) string { _, t, _ := strings.Cut(n, "): "); return t }, targets: []string{"qemu-img convert -n"}, min: 1.0},
		// bench/migrate.sh: a volume migrated between two agents
		{title: "volume migrated between two agents (10% data, TLS), cold source, vs the peers over TLS", sec: "g",
			match: func(n string) bool { return strings.HasPrefix(n, "stowage") || strings.Contains(n, "over TLS") }, trim: same,
			targets: []string{"nbdcopy (qemu-nbd export over TLS", "qemu-img convert -W -m 8 (qemu-nbd export over TLS"}, min: 1.0},
		{title: "volume migrated between two agents (10% data, TLS), cold source, vs the peers over plain NBD", sec: "g",
			match: func(n string) bool { return !strings.Contains(n, "over TLS") }, trim: same,
			targets: []string{"nbdcopy (qemu-nbd export -> file)", "qemu-img convert -W -m 8 (qemu-nbd export -> file)"}},
		// bench/rbd.sh: a Ceph RBD primary store
		{title: "rbd: volume from a cached template, RBD clone vs directory qcow2 linked clone, p50", sec: "k", match: suffix(", p50"),
			trim: trimSuffix(", p50"), targets: []string{"directory store linked clone"}, unit: "ms"},
		{title: "rbd: volume from a cached template, RBD clone vs directory qcow2 linked clone, p99", sec: "k", match: suffix(", p99"),
			trim: trimSuffix(", p99"), targets: []string{"directory store linked clone"}, unit: "ms"},
		{title: "rbd: template import into the pool (+ first clone) vs qemu-img convert to rbd:", sec: "k",
			match: func(n string) bool { return strings.Contains(n, "import") || strings.HasPrefix(n, "qemu-img convert") }, trim: same,
			targets: []string{"qemu-img convert"}, unit: "ms"},
	}, scaleScenarios(oneOf, same)...)
}

// scaleScenarios are bench/scale.sh's targets (issue 16), one set per
// metadata engine; its rows end in " [badger]" or " [etcd]".
func scaleScenarios(oneOf func(...string) func(string) bool, same func(string) string) []scenario {
	var out []scenario
	for _, b := range []string{"badger", "etcd"} {
		tag := " [" + b + "]"
		ms := func(title, name string, maxMs float64) scenario {
			return scenario{title: "scale" + tag + ": " + title, sec: "s", match: oneOf("stowage: " + name + tag), trim: same, unit: "ms", maxMs: maxMs}
		}
		out = append(out,
			scenario{title: "scale" + tag + ": state transitions/s (meta, in process, 8 writers)", sec: "s",
				match: oneOf("stowage: state transitions"+tag, "target: 5000 transitions/s"+tag), trim: same,
				targets: []string{"target"}, min: 1.0, unit: "transitions/s"},
			ms("ListVolumes first page (500), p99", "list volumes first page p99", 50),
			ms("ListVolumes filtered (store + state, 100), p99", "list volumes filtered p99", 50),
			ms("volume create plan (dry run, API), p99", "plan create dry run p99", 5),
			ms("volume create plan (dry run, in process), p99", "plan in process p99", 5),
			ms("controller CPU, 1,000 hosts at 10 s (ms of CPU per s)", "controller CPU ms per s, steady", 100),
			ms("heartbeat latency, steady, p99", "heartbeat p99, steady", 0),
			ms("heartbeat latency, saturation, p99", "heartbeat p99, saturation", 0),
		)
	}
	return out
}

// mergeRows folds rows of the same section, test and unit into one (in the
// order of their first appearance): the median of the medians of the rows
// that did not fail, the least minimum and the greatest maximum, and the
// note of the first with the number of merged rows appended.
func mergeRows(rows []row) []row {
	type key struct{ sec, name, unit string }
	var order []key
	byKey := map[key][]row{}
	for _, r := range rows {
		k := key{r.sec, r.name, r.unit}
		if r.unit == "" || r.unit == "-" {
			k.unit = ""
		}
		if _, ok := byKey[k]; !ok {
			order = append(order, k)
		}
		byKey[k] = append(byKey[k], r)
	}
	out := make([]row, 0, len(order))
	for _, k := range order {
		rs := byKey[k]
		var ok []row
		for _, r := range rs {
			if r.ok {
				ok = append(ok, r)
			}
		}
		if len(ok) == 0 {
			out = append(out, rs[0])
			continue
		}
		m := ok[0]
		meds := make([]float64, 0, len(ok))
		for _, r := range ok {
			meds = append(meds, r.median)
			m.lo = min(m.lo, r.lo)
			m.hi = max(m.hi, r.hi)
		}
		sort.Float64s(meds)
		n := len(meds)
		if n%2 == 1 {
			m.median = meds[n/2]
		} else {
			m.median = (meds[n/2-1] + meds[n/2]) / 2
		}
		m.note = strings.TrimSpace(fmt.Sprintf("%s (median of %d invocations", m.note, n))
		if len(ok) < len(rs) {
			m.note += fmt.Sprintf(", %d failed", len(rs)-len(ok))
		}
		m.note += ")"
		out = append(out, m)
	}
	return out
}

func readTSV(path string) ([]row, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var rows []row
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Split(sc.Text(), "\t")
		if len(fs) < 7 {
			continue
		}
		r := row{sec: fs[0], name: fs[1], unit: fs[2], note: fs[6]}
		var e1, e2, e3 error
		r.median, e1 = strconv.ParseFloat(fs[3], 64)
		r.lo, e2 = strconv.ParseFloat(fs[4], 64)
		r.hi, e3 = strconv.ParseFloat(fs[5], 64)
		r.ok = e1 == nil && e2 == nil && e3 == nil && !strings.Contains(r.note, "FAILED")
		rows = append(rows, r)
	}
	return rows, sc.Err()
}

// pick returns the rows of a scenario, ours first.
func pick(rows []row, s scenario, ours string) (our *row, peers []row) {
	for i := range rows {
		r := rows[i]
		if r.sec != s.sec || !s.match(r.name) || !r.ok || r.unit != s.rowUnit() {
			continue
		}
		if strings.HasPrefix(s.trim(r.name), ours) {
			if our == nil {
				our = &rows[i]
			}
			continue
		}
		peers = append(peers, r)
	}
	if s.rowUnit() == "ms" {
		sort.Slice(peers, func(i, j int) bool { return peers[i].median < peers[j].median })
	} else {
		sort.Slice(peers, func(i, j int) bool { return peers[i].median > peers[j].median })
	}
	return our, peers
}

func writeMarkdown(w io.Writer, title string, rows []row, scen []scenario, ours, command, factsPath string) {
	fmt.Fprintf(w, "## %s, %s\n\n", title, time.Now().UTC().Format("2006-01-02 15:04 MST"))
	if command != "" {
		fmt.Fprintf(w, "Command: `%s`\n\n", command)
	}
	if factsPath != "" {
		if b, err := os.ReadFile(factsPath); err == nil {
			fmt.Fprintf(w, "%s\n", strings.TrimSpace(string(b)))
			fmt.Fprintln(w)
		}
	}
	fmt.Fprintln(w, "Every figure is the median of the runs of one invocation (MiB/s of virtual size; copies are timed until `sync`),")
	fmt.Fprintln(w, "or with -merge the median of several invocations' figures; ratios compare figures of the same invocations.")
	fmt.Fprintln(w, "Gaps under about 30% are within this machine's noise. A latency row (ms) is met under its absolute target.")
	fmt.Fprintln(w)
	fmt.Fprintf(w, "| scenario | %s | target peer | %s / target | required | met | best peer | %s / best |\n", ours, ours, ours)
	fmt.Fprintln(w, "|---|---:|---|---:|---:|---|---|---:|")
	for _, s := range scen {
		v, ok := evaluate(rows, s, ours)
		if !ok {
			continue // a scenario of another script
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s |\n", s.title, v.ourText, v.targetText, v.ratioText, v.required, v.metText, v.bestText, v.bestRatio)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "All rows (the last column is %s's median divided by the row's, within the same scenario):\n\n", ours)
	fmt.Fprintln(w, "| sec | test | median | min | max | unit | ratio | note |")
	fmt.Fprintln(w, "|---|---|---:|---:|---:|---|---:|---|")
	for _, r := range rows {
		ratio := "-"
		for _, s := range scen {
			if r.sec == s.sec && s.match(r.name) && r.ok {
				if our, _ := pick(rows, s, ours); our != nil && r.median > 0 {
					ratio = fmt.Sprintf("%.2fx", our.median/r.median)
				}
				break
			}
		}
		if !r.ok {
			fmt.Fprintf(w, "| %s | %s | - | - | - | %s | - | %s |\n", r.sec, r.name, r.unit, r.note)
			continue
		}
		fmt.Fprintf(w, "| %s | %s | %.1f | %.1f | %.1f | %s | %s | %s |\n", r.sec, r.name, r.median, r.lo, r.hi, r.unit, ratio, r.note)
	}
}

// verdict is one scenario's comparison: ours against its target peer
// (the best row among the targets) and the best peer of all.
type verdict struct {
	our, target, best *row
	// ratio is the figure drawn in the chart, higher is better: ours /
	// target for throughput, target / ours for a latency with a peer, and
	// limit / ours for a latency with an absolute limit only. hasRatio
	// says whether there is one.
	ratio, need                  float64
	hasRatio, met, judged        bool
	ourText, targetText          string
	ratioText, required, metText string
	bestText, bestRatio          string
}

// evaluate compares ours with the scenario's peers. ok is false when the
// results hold no row of the scenario at all.
func evaluate(rows []row, s scenario, ours string) (v verdict, ok bool) {
	our, peers := pick(rows, s, ours)
	if our == nil && len(peers) == 0 {
		return v, false
	}
	v = verdict{our: our, target: s.target(peers), ourText: "-", targetText: "-", ratioText: "-",
		required: "-", metText: "not measured", bestText: "-", bestRatio: "-"}
	if len(peers) > 0 {
		v.best = &peers[0]
	}
	latency := s.rowUnit() == "ms"
	if len(s.targets) > 0 {
		v.targetText = s.targetName()
	}
	if v.target != nil {
		if latency {
			v.targetText = fmt.Sprintf("%s (%.1f ms)", s.trim(v.target.name), v.target.median)
		} else {
			v.targetText = fmt.Sprintf("%s (%.0f)", s.trim(v.target.name), v.target.median)
		}
	}
	switch {
	case latency && s.maxMs > 0:
		v.required = fmt.Sprintf("< %.0f ms", s.maxMs)
	case latency:
		v.required = "none yet"
	default:
		v.required = fmt.Sprintf("%.2fx", s.min)
	}
	if our == nil {
		return v, true
	}
	if latency {
		v.ourText = fmt.Sprintf("%.1f ms", our.median)
	} else {
		v.ourText = fmt.Sprintf("%.0f", our.median)
	}
	if v.best != nil {
		if latency {
			v.bestText = fmt.Sprintf("%s (%.1f ms)", s.trim(v.best.name), v.best.median)
			v.bestRatio = fmt.Sprintf("%.2fx the time", our.median/v.best.median)
		} else {
			v.bestText = fmt.Sprintf("%s (%.0f)", s.trim(v.best.name), v.best.median)
			v.bestRatio = fmt.Sprintf("%.2fx", our.median/v.best.median)
		}
	}
	switch {
	case latency:
		if v.target != nil {
			v.ratioText = fmt.Sprintf("%.2fx the time", our.median/v.target.median)
		}
		if s.maxMs > 0 {
			v.judged, v.met = true, our.median < s.maxMs
			v.hasRatio, v.ratio, v.need = true, s.maxMs/our.median, 1
		} else {
			v.metText = "no target"
			if v.target != nil {
				v.hasRatio, v.ratio = true, v.target.median/our.median
			}
		}
	case v.target != nil:
		v.ratio, v.need, v.hasRatio, v.judged = our.median/v.target.median, s.min, true, true
		v.ratioText = fmt.Sprintf("%.2fx", v.ratio)
		v.met = v.ratio >= s.min
	default:
		v.metText = "no target row"
	}
	if v.judged {
		v.metText = "yes"
		if !v.met {
			if latency {
				v.metText = "**no**"
			} else {
				v.metText = fmt.Sprintf("**no** (%.0f%% short)", (1-v.ratio/s.min)*100)
			}
		}
	}
	if n := allocNote(*our); n != "" {
		v.metText += "; " + n
	}
	return v, true
}

// allocNote reports the destination allocation recorded in a row's note.
func allocNote(r row) string {
	if i := strings.Index(r.note, "dst allocated"); i >= 0 {
		n := r.note[i:]
		if j := strings.Index(n, ";"); j >= 0 {
			n = n[:j]
		}
		return n
	}
	return ""
}

// writePNG draws, first, one bar per scenario: ours as a ratio to its
// target peer (green when the required ratio, the black tick, is met, red
// when not, grey when there is no requirement), then one group of
// horizontal bars per scenario with every row's median.
func writePNG(path string, rows []row, scen []scenario, ours string) error {
	const (
		scale   = 2
		lineH   = 9 * scale
		barH    = 7 * scale
		labelW  = 44 * 6 * scale
		barMaxW = 520
		margin  = 20
		width   = margin + labelW + 10 + barMaxW + 120
	)
	type group struct {
		title string
		bars  []row
		ours  int
	}
	type ratioBar struct {
		label       string
		v           verdict
		latencyOnly bool
	}
	var ratios []ratioBar
	for _, s := range scen {
		if v, ok := evaluate(rows, s, ours); ok && v.hasRatio {
			ratios = append(ratios, ratioBar{label: s.title, v: v, latencyOnly: s.rowUnit() == "ms" && s.maxMs > 0})
		}
	}
	var groups []group
	height := margin
	if len(ratios) > 0 {
		height += lineH*4 + len(ratios)*(2*lineH+8) + 24
	}
	for _, s := range scen {
		our, peers := pick(rows, s, ours)
		if our == nil && len(peers) == 0 {
			continue
		}
		g := group{title: s.title + " (" + s.rowUnit() + ", median)", ours: -1}
		if our != nil {
			g.bars = append(g.bars, *our)
			g.ours = 0
		}
		g.bars = append(g.bars, peers...)
		for i := range g.bars {
			g.bars[i].name = s.trim(g.bars[i].name)
		}
		groups = append(groups, g)
		height += lineH*2 + len(g.bars)*lineH + 12
	}
	height += margin
	img := image.NewRGBA(image.Rect(0, 0, width, height))
	white := color.RGBA{255, 255, 255, 255}
	for y := range height {
		for x := range width {
			img.Set(x, y, white)
		}
	}
	black := color.RGBA{20, 20, 20, 255}
	peerC := color.RGBA{90, 120, 170, 255}
	ourC := color.RGBA{230, 120, 20, 255}
	y := margin
	if len(ratios) > 0 {
		drawText(img, margin, y, scale, ours+" / target peer, same run (latency: limit / "+ours+"); tick: required", black)
		y += lineH * 2
		drawText(img, margin, y, scale, "green: met  red: missed  grey: no requirement", black)
		y += lineH * 2
		maxR := 2.0
		for _, r := range ratios {
			maxR = max(maxR, min(r.v.ratio, 6))
		}
		x0 := margin + 10
		full := width - x0 - 140
		one := int(1 / maxR * float64(full))
		for _, r := range ratios {
			label := r.label
			if len(label) > 90 {
				label = label[:90]
			}
			drawText(img, margin, y, scale, label, black)
			y += lineH
			c := color.RGBA{150, 150, 150, 255}
			if r.v.judged {
				c = color.RGBA{40, 150, 60, 255}
				if !r.v.met {
					c = color.RGBA{200, 40, 40, 255}
				}
			}
			w := int(min(r.v.ratio, maxR) / maxR * float64(full))
			for yy := y; yy < y+barH; yy++ {
				for xx := x0; xx < x0+w; xx++ {
					img.Set(xx, yy, c)
				}
				img.Set(x0+one, yy, black) // 1.0x
			}
			if r.v.judged {
				t := x0 + int(r.v.need/maxR*float64(full))
				for yy := y - 3; yy < y+barH+3; yy++ {
					for xx := t - 1; xx <= t+1; xx++ {
						img.Set(xx, yy, black)
					}
				}
			}
			drawText(img, x0+w+8, y, scale, strconv.FormatFloat(r.v.ratio, 'f', 2, 64)+"X", black)
			y += lineH + 8
		}
		y += 24
	}
	for _, g := range groups {
		drawText(img, margin, y, scale, g.title, black)
		y += lineH * 2
		maxV := 0.0
		for _, b := range g.bars {
			maxV = max(maxV, b.median)
		}
		for i, b := range g.bars {
			name := b.name
			if len(name) > 44 {
				name = name[:44]
			}
			c := peerC
			if i == g.ours {
				c = ourC
			}
			drawText(img, margin, y, scale, name, black)
			w := int(b.median / maxV * barMaxW)
			x0 := margin + labelW + 10
			for yy := y; yy < y+barH; yy++ {
				for xx := x0; xx < x0+w; xx++ {
					img.Set(xx, yy, c)
				}
			}
			prec := 0
			if b.median < 100 {
				prec = 1
			}
			drawText(img, x0+w+6, y, scale, strconv.FormatFloat(b.median, 'f', prec, 64), black)
			y += lineH
		}
		y += 12
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
